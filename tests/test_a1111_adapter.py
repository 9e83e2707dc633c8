"""Unit tests of the A1111 adapter (gmi_a1111/, loaded by scripts/gmi_*.py) against a faithful fake of the WebUI's modules.*.

The real WebUI is exercised by tests/test_a1111_integration.py (opt-in, GMI_A1111_DIR).
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import importlib.util
import io
import json
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.a1111_support.fake_webui import FakeWebui

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"


@pytest.fixture(scope="session")
def encoder_file(tmp_path_factory) -> Path:
    from gmi_core.encoders import save_encoder, tiny_encoder

    return save_encoder(tiny_encoder(0), tmp_path_factory.mktemp("enc") / "gmi-tiny.safetensors")


@pytest.fixture
def webui(tmp_path, monkeypatch) -> FakeWebui:
    fake = FakeWebui(tmp_path / "webui")
    fake.install(monkeypatch)
    for name in [n for n in sys.modules if n == "gmi_a1111" or n.startswith("gmi_a1111.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(REPO))  # as the WebUI does while it loads scripts/: the extension root
    monkeypatch.delenv("GMI_A1111_ENCODER", raising=False)
    return fake


def gmi(name: str):
    return importlib.import_module(f"gmi_a1111.{name}")


@pytest.fixture
def world(webui, encoder_file, tmp_path):
    """Three SD1 checkpoints, a LoRA and a truncated file; options as a user would set them."""
    for i in range(3):
        webui.add_checkpoint(f"model_{i}.safetensors", seed=i)
    webui.add_checkpoint("sub/lora_x.safetensors", seed=9, kind="lora")
    (webui.ckpt_dir / "broken.safetensors").write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a":')
    webui.refresh()
    gmi("options").on_ui_settings()
    prompts = webui.models_path / "gmi" / "prompt_sets" / "prompts.json"  # prompt sets live in gmi's folder
    prompts.parent.mkdir(parents=True)
    prompts.write_text(json.dumps(["a red car", "a portrait of a woman", "a bowl of fruit"]))
    opts = webui.shared.opts
    clip = webui.models_path / "gmi" / "clip"  # a setting may name files inside the WebUI's folders only
    clip.mkdir(parents=True, exist_ok=True)
    shutil.copy(encoder_file, clip / encoder_file.name)
    opts.set("gmi_encoder", str(clip / encoder_file.name))
    opts.set("gmi_prompt_set", prompts.name)
    opts.set("gmi_budget", "allx2")
    opts.set("gmi_sd1_steps", 3)
    opts.set("gmi_sd1_width", 64)
    opts.set("gmi_sd1_height", 64)
    opts.set("sd_model_checkpoint", "model_0.safetensors")
    webui.reload_model_weights()
    return webui


def b64png(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def ready_specs(client, **kwargs):
    """GET /gmi/v1/specs until the encoder has loaded (the route answers "loading" rather than wait, issue 18)."""
    deadline = time.monotonic() + 120
    while True:
        r = client.get("/gmi/v1/specs", **kwargs)
        if r.status_code != 200 or r.json()["encoder_state"] != "loading" or time.monotonic() > deadline:
            return r
        time.sleep(0.1)


def load_entry_script(name: str):
    spec = importlib.util.spec_from_file_location(f"gmi_entry_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
def test_entry_scripts_register_their_callbacks_and_leave_sys_path(webui, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))  # the WebUI puts the extension root first while loading
    before = list(sys.path)
    load_entry_script("gmi_settings")
    load_entry_script("gmi_api")
    registered = sys.modules["modules.script_callbacks"].registered
    assert len(registered["ui_settings"]) == 1 and len(registered["app_started"]) == 1
    assert sys.path == before


def test_settings_section(webui):
    gmi("options").on_ui_settings()
    labels = webui.shared.opts.data_labels
    runtime = gmi("runtime")
    for key, (default, label, help_text) in runtime.OPTIONS.items():
        assert labels[key].section[0] == "gmi" and labels[key].label == label
        assert webui.shared.opts.data[key] == default
        assert (help_text in labels[key].comment_after) if help_text else labels[key].comment_after == ""
        assert (labels[key].onchange is runtime.reset) == (key in runtime.RESETTING_OPTIONS)
    assert runtime.spec_dir() == webui.models_path / "gmi"
    webui.shared.opts.set("gmi_spec_dir", str(webui.root / "elsewhere"))
    assert runtime.spec_dir() == webui.root / "elsewhere"


def test_source_lists_sd_checkpoints_hashes_through_webui_cache_and_skips_the_rest(world):
    host = gmi("host")
    listing = host.WebuiCheckpointSource().list_checkpoints()
    assert [c.name for c in listing.checkpoints] == [
        "model_0.safetensors",
        "model_1.safetensors",
        "model_2.safetensors",
    ]
    for c in listing.checkpoints:
        assert c.sha256 == hashlib.sha256(c.path.read_bytes()).hexdigest()
    reasons = {s.name: s.reason for s in listing.skipped}
    assert "LoRA" in reasons["sub/lora_x.safetensors"]
    assert "unreadable" in reasons["broken.safetensors"]
    # hashed once each via modules.hashes with the WebUI's "checkpoint/<name>" key, titles now carry the short hash
    assert sorted(world.hash_calls) == [
        "checkpoint/model_0.safetensors",
        "checkpoint/model_1.safetensors",
        "checkpoint/model_2.safetensors",
    ]
    titles = sorted(world.sd_models.checkpoints_list)
    assert all("[" in t for t in titles if t.startswith("model_"))
    host.WebuiCheckpointSource().list_checkpoints()
    assert len(world.hash_calls) == 3


def test_no_hashing_falls_back_to_gmi_cache(webui, tmp_path):
    webui.shared.cmd_opts.no_hashing = True
    path = webui.add_checkpoint("m.safetensors", seed=1)
    webui.refresh()
    listing = gmi("host").WebuiCheckpointSource(hash_cache=tmp_path / "h.json").list_checkpoints()
    assert listing.checkpoints[0].sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (tmp_path / "h.json").is_file() and not webui.hash_calls


def test_resolve_checkpoint_only_through_the_webui_list(world):
    host = gmi("host")
    gmi("host").WebuiCheckpointSource().list_checkpoints()
    info = host.resolve_checkpoint("model_1.safetensors")
    assert host.resolve_checkpoint(info.title) is info
    assert host.resolve_checkpoint(info.sha256) is info
    assert host.resolve_checkpoint(info.sha256[:10]) is info
    from gmi_core.errors import CheckpointError

    for bad in ("", "/etc/passwd", str(world.ckpt_dir / "model_1.safetensors"), "model_9"):
        with pytest.raises(CheckpointError):
            host.resolve_checkpoint(bad)


def test_generator_renders_through_processing_with_checkpoint_override(world):
    host = gmi("host")
    from gmi_core.protocols import GenerationSettings

    source = host.WebuiCheckpointSource()
    ckpt = source.list_checkpoints().checkpoints[2]
    settings = GenerationSettings(steps=3, cfg=5.0, sampler="Euler", scheduler="Automatic", width=64, height=64)
    images = host.WebuiGenerator(source).generate(ckpt, "a cat", [11, 12], settings)
    assert len(images) == 2 and images[0].size == (64, 64)
    p = world.process_calls[-1]
    assert p.prompt == ["a cat", "a cat"] and p.seed == [11, 12] and p.batch_size == 2 and p.n_iter == 1
    assert (p.steps, p.cfg_scale, p.sampler_name, p.width, p.height) == (3, 5.0, "Euler", 64, 64)
    assert p.do_not_save_samples and p.do_not_save_grid
    assert p.override_settings["sd_model_checkpoint"] == source.title_for(ckpt)
    # the user's checkpoint option is restored; the override model stays loaded (like the WebUI)
    assert world.shared.opts.sd_model_checkpoint == "model_0.safetensors"
    assert world.shared.sd_model.sd_checkpoint_info.name == "model_2.safetensors"
    assert world.shared.state.job_no == 1


def test_generator_interrupt_raises_cancelled(world):
    host = gmi("host")
    from gmi_core.errors import Cancelled
    from gmi_core.protocols import GenerationSettings

    source = host.WebuiCheckpointSource()
    ckpt = source.list_checkpoints().checkpoints[0]
    world.interrupt_after = 1
    with pytest.raises(Cancelled):
        host.WebuiGenerator(source).generate(ckpt, "a cat", [1, 2], GenerationSettings(width=64, height=64))


def test_build_job_holds_queue_lock_reports_progress_and_identifies(world, monkeypatch):
    build, runtime = gmi("build"), gmi("runtime")
    seen_locked = []
    original = world.modules["modules.processing"].process_images

    def spying(p):
        seen_locked.append(world.modules["modules.call_queue"].queue_lock.locked())
        return original(p)

    world.modules["modules.processing"].process_images = spying
    job = build.start_build("missing", wait=True)
    assert job.state == "done", job.error
    assert sorted(job.report["built"]) == ["model_0.safetensors", "model_1.safetensors", "model_2.safetensors"]
    assert {s["name"] for s in job.report["skipped"]} == {"sub/lora_x.safetensors", "broken.safetensors"}
    assert len(seen_locked) == 9 and all(seen_locked)  # 3 checkpoints x 3 prompts, one batch each
    assert world.state_log == [("begin", job.id), ("end", None)]
    progress = world.modules["modules.progress"].tasks
    assert progress == [("queued", job.id), ("start", job.id), ("finish", job.id)]
    assert job.images_done == job.images_total == 6
    assert job.images_planned == job.images_rendered == 18 and job.eta_s == 0 and job.seconds_per_image > 0
    status = runtime.status()
    assert [c["state"] for c in status["checkpoints"]] == ["ready"] * 3
    assert status["images_missing"] == 0 and status["family_settings"]["sd1"]["width"] == 64
    assert (
        status["family_settings"]["sdxl"]["width"] == 1024
        and [c["family"] for c in status["checkpoints"]] == ["sd1"] * 3
    )
    other = runtime.status(steps=7, budget="allx3")  # API overrides: every family, and the budget
    assert {v["steps"] for v in other["family_settings"].values()} == {7} and other["images_missing"] == 3 * 3
    assert {c["state"] for c in other["checkpoints"]} == {"partial"} and not any(
        c["current"] for c in other["checkpoints"]
    )
    assert status["config"]["budget"] == "allx2" and other["config"]["budget"] == "allx3"
    monkeypatch.setitem(sys.modules, "gradio", type(sys)("gradio"))  # ui.py imports it; status_rows uses none of it
    _, names, todo, note = gmi("ui").status_rows()  # the Build tab renders the same payload
    assert names == [c["name"] for c in status["checkpoints"]] and not todo
    assert "specs in <code>gmi</code>" in note and str(world.root) not in note  # relative to models/, issue 18
    assert "gmi-tiny-clip-s0" in note and "sd1 64x64, 3 steps" in note
    # an unseen prompt and seed from each checkpoint ranks it first
    fake = world
    for info in sorted(
        {i.filename: i for i in world.sd_models.checkpoints_list.values()}.values(), key=lambda i: i.name
    ):
        if not info.name.startswith("model_"):
            continue
        query = fake.render(info.filename, "a lighthouse in a storm", 987654, 64, 64)
        _, data = runtime.identify([query], top_k=3, thumbnails=True)
        assert data["ranking"][0]["name"] == info.name
        assert data["ranking"][0]["title"] == info.title
        assert data["ranking"][0]["top_prompts"][0]["thumbnail"].startswith("data:image/png;base64,")


def test_build_is_resumable_after_interrupt(world):
    build, runtime = gmi("build"), gmi("runtime")
    world.interrupt_after = 2
    job = build.start_build(["model_1.safetensors"], wait=True)
    assert job.state == "cancelled" and job.report["cancelled"]
    status = {c["name"]: c for c in runtime.status()["checkpoints"]}
    assert status["model_1.safetensors"]["state"] == "partial"
    assert status["model_1.safetensors"]["prompts_done"] == 1
    assert world.shared.state.interrupted is False  # reset for the next WebUI job
    world.interrupt_after = None
    calls = len(world.process_calls)
    job = build.start_build(["model_1.safetensors"], wait=True)
    assert job.state == "done" and len(world.process_calls) - calls == 2  # only the unfinished prompts
    assert {c["name"]: c["state"] for c in runtime.status()["checkpoints"]}["model_1.safetensors"] == "ready"


def test_api_handlers_validate_and_resolve(world):
    api, build = gmi("api"), gmi("build")
    with pytest.raises(api.HTTPException) as err:
        api.identify(
            api.IdentifyRequest(image=b64png(world.render(str(world.ckpt_dir / "model_0.safetensors"), "x", 1, 64, 64)))
        )
    assert err.value.status_code == 409 and "build specs first" in err.value.detail
    with pytest.raises(api.HTTPException) as err:
        api.start_build(api.BuildRequest(checkpoints=["nope.safetensors"]))
    assert err.value.status_code == 404
    with pytest.raises(api.HTTPException) as err:
        api.start_build(api.BuildRequest(checkpoints=[]))
    assert err.value.status_code == 422
    job = api.start_build(api.BuildRequest(checkpoints=["model_0", "model_2.safetensors"], wait=True))
    assert job["state"] == "done" and sorted(job["report"]["built"]) == ["model_0.safetensors", "model_2.safetensors"]
    assert api.build_status(job["id"])["state"] == "done"
    specs = api.specs()
    assert {c["name"]: c["state"] for c in specs["checkpoints"]} == {
        "model_0.safetensors": "ready",
        "model_1.safetensors": "missing",
        "model_2.safetensors": "ready",
    }
    assert specs["build"]["id"] == job["id"]
    image = b64png(world.render(str(world.ckpt_dir / "model_2.safetensors"), "a tree", 4242, 64, 64))
    result = api.identify(api.IdentifyRequest(image="data:image/png;base64," + image, prompt="a tree", top_k=1))
    assert [r["name"] for r in result["ranking"]] == ["model_2.safetensors"]
    assert result["prompt_source"] == "user"
    assert {e["name"] for e in result["excluded"]} >= {"model_1.safetensors"}
    for bad, code in (
        (api.IdentifyRequest(image="!!notbase64"), 422),
        (api.IdentifyRequest(), 422),
        (api.IdentifyRequest(image=base64.b64encode(b"not an image").decode()), 422),
        (api.IdentifyRequest(image=image, method="magic"), 422),
    ):
        with pytest.raises(api.HTTPException) as err:
            api.identify(bad)
        assert err.value.status_code == code
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        api.IdentifyRequest(image=image, top_k=0)
    with pytest.raises(ValidationError):
        api.BuildRequest(steps=0)
    # switch: resolved through the list, set like the settings page (onchange reloads), saved
    out = api.switch(api.SwitchRequest(checkpoint="model_2.safetensors"))
    assert world.shared.opts.sd_model_checkpoint == out["title"] and out["title"].startswith("model_2.safetensors [")
    assert world.shared.sd_model.sd_checkpoint_info.name == "model_2.safetensors"
    assert world.shared.opts.saved == [world.config_filename]
    with pytest.raises(api.HTTPException) as err:
        api.switch(api.SwitchRequest(checkpoint=str(world.ckpt_dir / "model_1.safetensors")))
    assert err.value.status_code == 404
    assert build.active_job() is None


def test_api_build_refuses_a_second_build_while_one_runs(world):
    api, build = gmi("api"), gmi("build")
    lock = world.modules["modules.call_queue"].queue_lock
    lock.acquire()  # a txt2img job is running: the build queues behind it
    try:
        first = api.start_build(api.BuildRequest())
        assert first["state"] == "queued"
        with pytest.raises(api.HTTPException) as err:
            api.start_build(api.BuildRequest())
        assert err.value.status_code == 409
    finally:
        lock.release()
    import time

    for _ in range(600):
        if build.get_job(first["id"]).finished:
            break
        time.sleep(0.05)
    assert build.get_job(first["id"]).state == "done"


def test_autoselect_sets_override_and_infotext(world):
    build, autoselect = gmi("build"), gmi("autoselect")
    build.start_build("missing", wait=True)
    processing = world.modules["modules.processing"]
    p = processing.StableDiffusionProcessingTxt2Img(prompt="a castle", width=64, height=64)
    ref = world.render(str(world.ckpt_dir / "model_1.safetensors"), "a ship", 777, 64, 64)
    assert autoselect.apply(p, False, ref) is None and p.override_settings == {}
    title = autoselect.apply(p, True, b64png(ref), "")
    assert title.startswith("model_1.safetensors [")
    assert p.override_settings["sd_model_checkpoint"] == title
    assert p.extra_generation_params[autoselect.INFOTEXT_KEY] == f"model_1.safetensors [{title.split('[')[1]}"
    # the override is honoured by process_images: rendered with model_1, the option left as the user had it
    processing.process_images(p)
    assert world.shared.sd_model.sd_checkpoint_info.name == "model_1.safetensors"
    assert world.shared.opts.sd_model_checkpoint == "model_0.safetensors"
    import numpy as np

    p2 = processing.StableDiffusionProcessingTxt2Img(prompt="x")
    assert autoselect.apply(p2, True, np.asarray(ref)) == title
    p3 = processing.StableDiffusionProcessingTxt2Img(prompt="x")
    assert autoselect.apply(p3, True, None) is None and "no reference image" in p3.comments[0]


def test_missing_encoder_gives_a_clear_message(webui, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    webui.add_checkpoint("m.safetensors", seed=1)
    webui.refresh()
    gmi("options").on_ui_settings()
    api, runtime = gmi("api"), gmi("runtime")
    from gmi_core.errors import EncoderUnavailable

    with pytest.raises(EncoderUnavailable) as err:
        runtime.get_engine()
    message = str(err.value)
    assert "ViT-L-14" in message and "Settings > GMI" in message and "models/gmi/clip" in message
    assert str(webui.root) not in message  # the folder relative to the models folder, no server path (issue 18)
    with pytest.raises(api.HTTPException) as http:
        for _ in range(600):  # the status route answers "loading" until the background load has failed
            api.specs()
            time.sleep(0.1)
    assert http.value.status_code == 503


def test_clip_download_shows_progress_in_the_webui_and_on_the_console(webui, capfd):
    """Issue 18 class 10: the WebUI logs no INFO lines by default, so the download's progress is a byte bar on the
    console (stderr) beside the progress text, updated as bytes arrive."""
    update = gmi("runtime")._download_progress()
    total = 8 * 2**20
    for done in (2**20, 4 * 2**20):
        update(done, total)
        assert webui.shared.state.textinfo == f"gmi: downloading CLIP weights {100 * done // total}% of 8 MB"
    assert "CLIP weights:  50%" in capfd.readouterr().err.replace("\r", "\n").splitlines()[-1]
    update(total, total)
    assert "CLIP weights: 100%" in capfd.readouterr().err


def test_encoder_from_environment_overrides_setting(webui, encoder_file, monkeypatch):
    gmi("options").on_ui_settings()
    monkeypatch.setenv("GMI_A1111_ENCODER", str(encoder_file))
    assert gmi("runtime").get_engine().encoder.encoder_id == "gmi-tiny-clip-s0"


def test_routes_exist_only_with_the_webui_api(webui):
    fastapi = pytest.importorskip("fastapi")
    api = gmi("api")
    app = fastapi.FastAPI()
    api.on_app_started(None, app)  # started without --api: the WebUI serves no API, gmi adds none
    assert not [r for r in app.routes if r.path.startswith("/gmi/")]
    webui.shared.cmd_opts.api = True
    api.on_app_started(None, app)
    api.on_app_started(None, app)  # UI reload registers nothing twice
    assert sorted((r.path, sorted(r.methods)[0]) for r in app.routes if r.path.startswith("/gmi/")) == sorted(
        ("/gmi/v1" + p, m) for p, _, m in api.ROUTES
    )


def test_routes_use_the_webui_api_auth(world):
    """--api-auth protects /gmi/v1/ with the very dependency the WebUI's Api puts on /sdapi/v1/."""
    fastapi = pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    api = gmi("api")
    world.shared.cmd_opts.api, world.shared.cmd_opts.api_auth = True, "alice:s3cret,bob:pw2"
    app = fastapi.FastAPI()
    world.modules["modules.api.api"].Api(app, world.modules["modules.call_queue"].queue_lock)
    api.on_app_started(None, app)
    ours = {r.path: r for r in app.routes if r.path.startswith("/gmi/v1")}
    webui_route = next(r for r in app.routes if r.path == "/sdapi/v1/options")
    assert len(ours) == 9
    for route in ours.values():
        assert [d.dependency for d in route.dependencies] == [d.dependency for d in webui_route.dependencies]
    client = TestClient(app)
    image = b64png(world.render(str(world.ckpt_dir / "model_0.safetensors"), "x", 1, 64, 64))
    calls = [
        ("GET", "/gmi/v1/specs", None),
        ("GET", "/gmi/v1/build", None),
        ("POST", "/gmi/v1/build", {"wait": True}),
        ("POST", "/gmi/v1/identify", {"image": image}),
        ("POST", "/gmi/v1/interrogate", {"image": image}),
        ("POST", "/gmi/v1/switch", {"checkpoint": "model_1.safetensors"}),
        ("GET", "/gmi/v1/build/x", None),
        ("POST", "/gmi/v1/import-images", {"root": "outputs"}),
        ("GET", "/gmi/v1/map", None),
        ("GET", "/gmi/v1/defaults", None),
        ("GET", "/sdapi/v1/options", None),
    ]
    for method, path, body in calls:
        for auth in (None, ("alice", "wrong"), ("mallory", "s3cret"), ("bob", "pw")):
            r = client.request(method, path, json=body, auth=auth)
            assert r.status_code == 401, (method, path, auth, r.text)
            assert r.headers["www-authenticate"] == "Basic"
    assert not world.process_calls and world.shared.opts.sd_model_checkpoint == "model_0.safetensors"  # nothing ran
    r = ready_specs(client, auth=("alice", "s3cret"))
    assert r.status_code == 200 and {c["name"] for c in r.json()["checkpoints"]} >= {"model_0.safetensors"}
    assert client.get("/gmi/v1/build", auth=("bob", "pw2")).status_code == 404  # authenticated; no job yet
    from gmi_core.service import defaults_payload

    assert client.get("/gmi/v1/defaults", auth=("bob", "pw2")).json() == defaults_payload()


def test_fallback_auth_when_the_webui_routes_are_not_found(world):
    """--api-auth set but no /sdapi/v1/ route to copy from: gmi fails closed with the same check."""
    fastapi = pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    api = gmi("api")
    world.shared.cmd_opts.api_auth = "alice:s3cret"
    app = fastapi.FastAPI()
    api.on_app_started(None, app)
    client = TestClient(app)
    assert client.get("/gmi/v1/specs").status_code == 401
    assert client.get("/gmi/v1/specs", auth=("alice", "nope")).status_code == 401
    assert client.get("/gmi/v1/specs", auth=("alice", "s3cret")).status_code == 200


def test_warm_start_loads_encoder_and_label_embeddings_in_the_background(world):
    runtime = gmi("runtime")
    assert runtime.warm_in_background() is None, "off by default: nothing loads at start unasked"
    world.shared.opts.set("gmi_warm_start", True)
    thread = runtime.warm_in_background()
    assert thread is not None and thread.daemon
    thread.join(timeout=120)
    engine = runtime.get_engine()
    assert list((engine.store.root / "cache").glob("labels--gmi-tiny-clip-s0--*.safetensors"))
    assert engine.interrogator._embeddings is not None and engine.encoder.device.type == "cpu"


def test_api_identify_refine_renders_only_the_contenders_in_the_queue(world, monkeypatch):
    """An API "refine": true on an ambiguous query (a near-duplicate pair) renders the pair's missing spec images with the
    WebUI pipeline under the queue lock, as a job, and answers with the ranking before and after."""
    api, build = gmi("api"), gmi("build")
    twin = world.add_checkpoint("model_0_twin.safetensors", seed=77)
    world.refresh()
    original_colour = world.colour_of
    model_0 = world.ckpt_dir / "model_0.safetensors"
    monkeypatch.setattr(world, "colour_of", lambda f: original_colour(model_0 if Path(f) == twin else f))
    assert build.start_build("missing", wait=True).state == "done"
    image = b64png(world.render(str(model_0), "a lighthouse in a storm", 987654, 64, 64))
    plain = api.identify(api.IdentifyRequest(image=image))
    assert plain["ambiguous"] is True and set(plain["contenders"]) == {"model_0.safetensors", twin.name}
    assert "refine" not in plain and all(0 <= r["confidence"] <= 1 for r in plain["ranking"])

    locked, calls_before = [], len(world.process_calls)
    process = world.modules["modules.processing"].process_images

    def spying(p):
        locked.append(world.modules["modules.call_queue"].queue_lock.locked())
        return process(p)

    world.modules["modules.processing"].process_images = spying
    world.state_log.clear()
    result = api.identify(api.IdentifyRequest(image=image, refine=True, top_k=2))
    refine = result["refine"]
    assert refine["before"]["ambiguous"] is True and refine["images_rendered"] == 2 * (3 * 4 - 3 * 2)
    assert {c["name"]: c["images_rendered"] for c in refine["checkpoints"]} == {"model_0.safetensors": 6, twin.name: 6}
    assert len(world.process_calls) - calls_before == 2 * 3 and locked and all(locked), "one batch per prompt, locked"
    assert world.state_log == [("begin", "gmi-refine"), ("end", None)] and world.shared.state.interrupted is False
    assert len(result["ranking"]) == 2 and len(refine["before"]["ranking"]) == 2
    monkeypatch.setitem(sys.modules, "gradio", type(sys)("gradio"))  # ui.py imports it; ranking_html uses none of it
    page = gmi("ui").ranking_html(result)
    assert "Before refine" in page and "12 image(s) rendered" in page and "Confidence" in page
    assert "<th>Checkpoint</th>" in page  # no LoRA row: the column says checkpoints
    result["ranking"][1]["model_kind"] = "lora"
    assert "<th>Checkpoint / LoRA</th>" in gmi("ui").ranking_html(result)


def test_a_lora_spec_renders_with_its_tag_and_fails_when_the_webui_did_not_apply_it(world, tmp_path):
    host, loras = gmi("host"), gmi("loras")
    from gmi_core.errors import CheckpointError
    from gmi_core.loras import LoraInfo, combination
    from gmi_core.protocols import GenerationSettings

    source = host.WebuiCheckpointSource()
    base = source.list_checkpoints().checkpoints[1]
    lora = LoraInfo("ink.safetensors", tmp_path / "ink.safetensors", "c" * 64, "sd1", "lora")
    model = combination(base, lora, 0.5)
    settings = GenerationSettings(steps=3, cfg=5.0, sampler="Euler", scheduler="Automatic", width=64, height=64)
    with pytest.raises(CheckpointError, match=r"did not apply the LoRA ink\.safetensors"):
        host.WebuiGenerator(source).generate(model, "a cat", [11], settings)  # the fake WebUI has no Lora network
    p = world.process_calls[-1]
    assert p.prompt == ["a cat <lora:ink:0.5>"] and p.override_settings["sd_model_checkpoint"] == source.title_for(base)
    row = {"title": model.name, "model_kind": "lora", "lora": {"base_sha256": base.sha256, "base_name": base.name}}
    row["lora"] |= {"lora_name": "ink.safetensors", "strength": 0.5}
    titles = {base.sha256: "base title [abc]"}
    assert loras.choice_value(row, titles) == "base title [abc] <lora:ink:0.5>"
    generation = type("P", (), {"prompt": "a dog <lora:ink:1>"})()
    assert loras.apply_to_generation(generation, row, titles) == "base title [abc]"
    assert generation.prompt == "a dog <lora:ink:0.5>"
