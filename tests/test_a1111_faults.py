"""Fault cases in the A1111 API and tab (issue 11), against the fake WebUI of test_a1111_adapter.

Moved from tests/test_faults.py (issue 11's fault suite, split by class in issue 19); each test name still
starts with its class."""

from __future__ import annotations

import json
import sys
import threading
import time

import pytest
import torch

from gmi_core.errors import GmiError
from tests.faults.harness import (
    no_server_path,
)
from tests.image_files import png_header_only
from tests.test_a1111_adapter import b64png, encoder_file, gmi, webui, world  # noqa: F401 - fixtures and helpers

torch.set_num_threads(1)

# ===================================================================================================================
# A1111: numbers, malformed bodies, chunked limit, busy switch, encoder load vs WebUI model load, name matching, UI
# ===================================================================================================================


@pytest.fixture
def a1111_world(world):  # noqa: F811 - the fake WebUI world of test_a1111_adapter
    return world


@pytest.fixture
def a1111_app(a1111_world):
    fastapi = pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    a1111_world.shared.cmd_opts.api = True
    app = fastapi.FastAPI()
    a1111_world.modules["modules.api.api"].Api(app, a1111_world.modules["modules.call_queue"].queue_lock)
    gmi("api").on_app_started(None, app)
    return TestClient(app), a1111_world


A1111_BAD_REQUESTS = [
    ("POST", "/gmi/v1/identify", {"content": b"not json", "headers": {"content-type": "application/json"}}),
    ("POST", "/gmi/v1/identify", {"content": b"image=x", "headers": {"content-type": "text/plain"}}),
    ("POST", "/gmi/v1/identify", {"json": {"image": 5}}),
    ("POST", "/gmi/v1/identify", {"json": {"images": ["x"] * 17}}),
    ("POST", "/gmi/v1/identify", {"json": {"image": "AAAA", "top_k": "many"}}),
    ("POST", "/gmi/v1/build", {"json": {"steps": "NaN"}}),
    ("POST", "/gmi/v1/build", {"content": b'{"cfg": NaN}', "headers": {"content-type": "application/json"}}),
    ("POST", "/gmi/v1/build", {"json": {"width": 65}}),
    ("POST", "/gmi/v1/build", {"json": {"prompt_set": "/etc/passwd"}}),
    ("POST", "/gmi/v1/build", {"json": {"prompt_set": "../../../../etc/passwd"}}),
    ("POST", "/gmi/v1/build", {"json": {"prompt_set": "%2e%2e/x.json"}}),
    ("POST", "/gmi/v1/build", {"json": {"checkpoints": ["../../etc/passwd"]}}),
    ("POST", "/gmi/v1/switch", {"json": {"checkpoint": "/etc/passwd"}}),
    ("POST", "/gmi/v1/switch", {"json": {}}),
    ("GET", "/gmi/v1/build/%2e%2e%2fx", {}),
]


@pytest.mark.parametrize("case", A1111_BAD_REQUESTS, ids=lambda c: f"{c[1]}-{str(c[2])[:30]}")
def test_faults_numbers_a1111_bad_requests_are_4xx_never_500(a1111_app, case):
    client, webui_world = a1111_app
    method, path, kwargs = case
    r = client.request(method, path, **kwargs)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    json.loads(r.text, parse_constant=lambda c: pytest.fail(f"{c} in a JSON answer"))
    assert no_server_path(r.text, webui_world.root)
    assert webui_world.process_calls == []


def test_security_a1111_chunked_body_over_the_limit_is_413(a1111_app, monkeypatch):
    client, _webui_world = a1111_app
    monkeypatch.setattr(gmi("api"), "MAX_REQUEST_BYTES", 10_000)

    def body():
        yield b'{"image": "'
        for _ in range(10):
            yield b"A" * 4096
        yield b'"}'

    r = client.post("/gmi/v1/identify", content=body(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "transfer-encoding" not in {
        k.lower() for k in r.request.headers if k.lower() == "content-length"
    }
    r = client.post("/gmi/v1/identify", content=b"x" * 20_000, headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_security_a1111_image_pixel_limit_and_no_path_in_errors(a1111_app):
    import base64

    client, webui_world = a1111_app
    r = client.post("/gmi/v1/identify", json={"image": base64.b64encode(png_header_only(20000, 20000)).decode()})
    assert r.status_code == 422 and "image too large" in r.json()["detail"]
    webui_world.shared.opts.set(
        "gmi_prompt_set", str(webui_world.root / "elsewhere.json")
    )  # a setting pointing outside
    r = client.get("/gmi/v1/specs")
    assert r.status_code == 404 and no_server_path(r.text, webui_world.root)


def test_etiquette_a1111_switch_during_a_build_is_busy_not_a_hang(a1111_app):
    client, webui_world = a1111_app
    build_module = gmi("build")
    lock = webui_world.modules["modules.call_queue"].queue_lock
    lock.acquire()  # a generation runs: the build waits in the queue
    try:
        job = client.post("/gmi/v1/build", json={}).json()
        assert job["state"] == "queued"
        t0 = time.perf_counter()
        r = client.post("/gmi/v1/switch", json={"checkpoint": "model_2.safetensors"})
        assert r.status_code == 409 and r.json()["detail"].startswith("busy") and time.perf_counter() - t0 < 2
        assert webui_world.shared.opts.sd_model_checkpoint == "model_0.safetensors"
    finally:
        lock.release()
    for _ in range(600):
        if build_module.get_job(job["id"]).finished:
            break
        time.sleep(0.05)
    assert build_module.get_job(job["id"]).state == "done"
    assert client.post("/gmi/v1/switch", json={"checkpoint": "model_2.safetensors"}).status_code == 200


def test_etiquette_a1111_job_status_ends_when_the_build_dies(a1111_world, monkeypatch):
    build_module, runtime = gmi("build"), gmi("runtime")

    def dying(**overrides):
        raise KeyboardInterrupt  # not an Exception: must still leave the job finished and not busy

    monkeypatch.setattr(runtime, "get_engine", dying)
    job = build_module.new_job("missing")
    with pytest.raises(KeyboardInterrupt):
        build_module._run_in_queue(job)
    assert job.state == "failed" and job.finished and build_module.active_job() is None
    assert a1111_world.state_log[-1] == ("end", None)
    monkeypatch.setattr(
        runtime, "get_engine", lambda **o: (_ for _ in ()).throw(OSError(30, "Read-only file system", "/srv/x"))
    )
    job = build_module.start_build("missing", wait=True)
    assert job.state == "failed" and job.error == "Read-only file system: x"


def test_etiquette_a1111_encoder_load_waits_for_the_webui_model_load(a1111_world):
    runtime = gmi("runtime")
    runtime.reset()
    model_lock = a1111_world.sd_models.model_data.lock
    queue_lock = a1111_world.modules["modules.call_queue"].queue_lock
    for lock in (model_lock, queue_lock):
        runtime.reset()
        lock.acquire()  # the WebUI is loading a checkpoint (start-up load / a switch in the queue)
        done = threading.Event()
        errors = []

        def load(done=done, errors=errors):
            try:
                runtime.get_engine()
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)
            done.set()

        threading.Thread(target=load).start()
        assert not done.wait(1.0), "the encoder loaded while the WebUI was loading a model"
        lock.release()
        assert done.wait(60) and not errors
    # inside a build (queue lock held by this thread) the load does not wait for itself
    runtime.reset()
    job = gmi("build").start_build("missing", wait=True)
    assert job.state == "done", job.error


def test_etiquette_a1111_switch_names_match_like_the_webui(a1111_world):
    host = gmi("host")
    host.WebuiCheckpointSource().list_checkpoints()
    info = host.resolve_checkpoint("model_1.safetensors")
    assert host.resolve_checkpoint("model_1") is info  # substring of a title, like override_settings
    assert host.resolve_checkpoint("model_1.safetensors [0000000000]") is info  # a stale checksum is ignored
    assert host.resolve_checkpoint(info.sha256[:10]) is info
    for name in ("MODEL_1", "/etc/passwd", str(a1111_world.ckpt_dir / "model_1.safetensors"), "   "):
        with pytest.raises(GmiError):
            host.resolve_checkpoint(name)


class _FakeGradio:
    """Just enough of gradio 3.41 to build the tab and record which events are wired (gradio is not a test dep)."""

    def __init__(self):
        self.components, self.events = [], []
        fake = self

        class Component:
            def __init__(self, *args, **kwargs):
                self.args, self.kwargs = args, kwargs
                fake.components.append(self)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def __getattr__(self, event):
                def register(fn=None, inputs=None, outputs=None, **kwargs):
                    fake.events.append((self, event, fn, inputs, outputs))
                    return self

                return register

        self.module = __import__("types").ModuleType("gradio")
        for name in (
            "Blocks",
            "Tab",
            "Row",
            "Column",
            "Image",
            "File",
            "Textbox",
            "Dropdown",
            "Slider",
            "Number",
            "Button",
            "HTML",
            "Dataframe",
            "CheckboxGroup",
            "State",
            "Accordion",
        ):
            setattr(self.module, name, type(name, (Component,), {}))
        self.module.update = lambda **kwargs: {"__update__": True, **kwargs}


@pytest.fixture
def gradio_tab(a1111_world, monkeypatch):
    fake = _FakeGradio()
    monkeypatch.setitem(sys.modules, "gradio", fake.module)
    call_queue = a1111_world.modules["modules.call_queue"]
    monkeypatch.setattr(call_queue, "wrap_gradio_gpu_call", lambda fn, extra_outputs=None: fn, raising=False)
    return fake, gmi("ui")


def test_etiquette_a1111_building_the_tab_does_nothing_heavy(gradio_tab, a1111_world, monkeypatch):
    fake, ui = gradio_tab
    runtime = gmi("runtime")
    runtime.reset()
    heavy = []
    monkeypatch.setattr(runtime, "get_encoder", lambda *a, **k: heavy.append("encoder"))
    monkeypatch.setattr(runtime, "status", lambda *a, **k: heavy.append("status"))
    a1111_world.hash_calls.clear()
    for info in a1111_world.sd_models.checkpoints_list.values():
        info.sha256 = None
    ui.on_ui_tabs()
    assert heavy == [] and a1111_world.hash_calls == []
    wired = {(type(c).__name__, e) for c, e, *_ in fake.events}
    assert ("Tab", "select") in wired  # status loads when the Build tab opens (and on Refresh)


def test_etiquette_a1111_refresh_reports_first_time_hashing(gradio_tab, a1111_world):
    _, ui = gradio_tab
    a1111_world.refresh()  # a fresh start: only the loaded model_0 is in the WebUI's hash cache
    a1111_world.hash_calls.clear()
    steps = list(ui.refresh_status())
    hashing = [s[0] for s in steps[:-1] if "hashing" in s[0]]
    assert all("loading the CLIP encoder" in s[0] for s in steps[:-1] if s[0] not in hashing)  # never waited for
    assert len(hashing) == len(a1111_world.hash_calls) == 2
    assert all(f"hashing {c.split('/', 1)[1]}" in h for c, h in zip(a1111_world.hash_calls, hashing))
    _note, rows, selected = steps[-1]
    assert [r[3] for r in rows[:3]] == ["missing"] * 3 and selected["choices"][:3] == [
        "model_0.safetensors",
        "model_1.safetensors",
        "model_2.safetensors",
    ]
    assert len(list(ui.refresh_status())) == 1  # hashed once: no hashing messages the second time


def test_etiquette_a1111_identify_never_reuses_the_last_pseudo_prompt(gradio_tab, a1111_world):
    fake, ui = gradio_tab
    gmi("build").start_build("missing", wait=True)
    ui.on_ui_tabs()
    prompt_box = next(
        c for c in fake.components if type(c).__name__ == "Textbox" and c.kwargs.get("elem_id") == "gmi_prompt"
    )
    identify_event = next(e for e in fake.events if e[1] == "click" and e[2] is ui.do_identify)
    assert prompt_box not in identify_event[4]  # identify never writes into what the user types
    first = a1111_world.render(str(a1111_world.ckpt_dir / "model_1.safetensors"), "a ship", 1, 64, 64)
    _html, used, choice = ui.do_identify(first, None, "", "gmi", 3)
    assert "interrogated" in used and choice["value"].startswith("model_1")
    # Interrogate fills the prompt on request; a new image clears what only came from the old image
    text, _, remembered = ui.do_interrogate(first, None)
    assert text == remembered and text
    cleared = ui.on_new_image(text, remembered)
    assert cleared[0] == "" and cleared[2] == ""
    kept = ui.on_new_image("my own words", remembered)
    assert kept[0]["__update__"] and kept[2] == remembered


def test_faults_alias_a1111_api_lists_both_names(a1111_app):
    client, webui_world = a1111_app
    (webui_world.ckpt_dir / "copy_of_model_1.safetensors").write_bytes(
        (webui_world.ckpt_dir / "model_1.safetensors").read_bytes()
    )
    webui_world.refresh()
    job = client.post("/gmi/v1/build", json={"wait": True}).json()
    built = job["report"]["built"]
    assert job["state"] == "done" and len(built) == 3  # the file behind two names was rendered once
    assert len({"model_1.safetensors", "copy_of_model_1.safetensors"} & set(built)) == 1
    specs = {c["name"]: c["state"] for c in client.get("/gmi/v1/specs").json()["checkpoints"]}
    assert specs["copy_of_model_1.safetensors"] == specs["model_1.safetensors"] == "ready"
    image = b64png(webui_world.render(str(webui_world.ckpt_dir / "model_1.safetensors"), "a tree", 4242, 64, 64))
    ranking = client.post("/gmi/v1/identify", json={"image": image, "prompt": "a tree"}).json()["ranking"]
    names = [r["name"] for r in ranking]
    assert len(names) == 3 and len({"model_1.safetensors", "copy_of_model_1.safetensors"} & set(names)) == 1
    row = next(r for r in ranking if r["name"] in ("model_1.safetensors", "copy_of_model_1.safetensors"))
    assert row["aliases"] and set(row["aliases"] + [row["name"]]) == {
        "model_1.safetensors",
        "copy_of_model_1.safetensors",
    }


A1111_LIBRARY_BAD_REQUESTS = [
    {"root": "outputs", "subfolder": "../../.."},
    {"root": "outputs", "subfolder": "/etc"},
    {"root": "outputs", "subfolder": "%2e%2e"},
    {"root": "outputs", "subfolder": "link_out"},
    {"root": "outputs", "subfolder": "nowhere"},
    {"root": "/etc"},
    {"root": "outputs", "subfolder": 5},
    {"root": "outputs", "subfolder": "x" * 600},
]


@pytest.mark.parametrize("body", A1111_LIBRARY_BAD_REQUESTS, ids=lambda b: str(b)[:40])
def test_faults_numbers_a1111_import_images_bad_requests_are_4xx(a1111_app, tmp_path, body):
    client, webui_world = a1111_app
    outputs = webui_world.root / "outputs"
    outputs.mkdir(exist_ok=True)
    (tmp_path / "elsewhere").mkdir(exist_ok=True)
    if not (outputs / "link_out").exists():
        (outputs / "link_out").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    r = client.post("/gmi/v1/import-images", json=body)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert no_server_path(r.text, webui_world.root, tmp_path)
    assert webui_world.process_calls == []
