"""Fault cases in the ComfyUI nodes and routes (issue 11): progress always ends, uploads, malformed requests, panel settings, library routes.

Moved from tests/test_faults.py (issue 11's fault suite, split by class in issue 19); each test name still
starts with its class."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import pytest
import torch

from gmi_core import limits
from tests.faults.harness import (
    no_server_path,
)
from tests.image_files import png_header_only
from tests.test_comfyui_nodes import (
    FakeGenerator,
    Interrupted,
    build,
    env,  # noqa: F401 - the fixture
    fake_image,
)

torch.set_num_threads(1)


# ===================================================================================================================
# Faults: interrupted or failed builds end the progress display (ComfyUI panel event, A1111 job status)
# ===================================================================================================================
@pytest.mark.parametrize("fault", ["interrupt_in_sampler", "os_error", "unexpected"])
def test_faults_progress_comfyui_panel_always_gets_done(env, monkeypatch, fault):  # noqa: F811 - the fixture
    sent = []
    monkeypatch.setattr(env.nodes.events, "send", lambda event, data: sent.append((event, data)))
    exc = {
        "interrupt_in_sampler": Interrupted("stop"),
        "os_error": OSError(28, "No space left on device"),
        "unexpected": KeyError("boom"),
    }[fault]
    original = FakeGenerator.generate

    def failing(self, *args, **kwargs):
        if len(FakeGenerator.calls) >= 2:
            raise exc
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FakeGenerator, "generate", failing)
    try:
        out, _ = build(env)
        report = out["ui"]["gmi_build"][0]
    except BaseException as raised:  # noqa: BLE001 - the interrupt propagates to ComfyUI, as it must
        assert fault in ("interrupt_in_sampler", "unexpected"), raised
        report = None
    done = [d for e, d in sent if e == "gmi.build.done"]
    assert len(done) == 1 and {"built", "failed", "cancelled"} <= set(done[0])
    if report is not None:
        assert report["failed"] and all("No space" in f["reason"] for f in report["failed"])


# ===================================================================================================================
# ComfyUI routes: uploads, hostile queries, malformed requests
# ===================================================================================================================
def _client(env):  # noqa: F811
    from aiohttp import web

    server = __import__("types").SimpleNamespace(routes=web.RouteTableDef())
    env.nodes.routes.register(server)
    app = web.Application()
    app.add_routes(server.routes)
    return app


def _png(index=3) -> bytes:
    buf = __import__("io").BytesIO()
    fake_image(index, "a harbour", 4242).save(buf, "PNG")
    return buf.getvalue()


def test_security_comfyui_uploads_are_limited_and_decoded_off_the_loop(env, monkeypatch):  # noqa: F811
    import aiohttp
    from aiohttp.test_utils import TestClient, TestServer

    build(env)
    app = _client(env)
    pack_limits = sys.modules[env.pack.__name__ + ".gmi_core.limits"]
    routes = env.nodes.routes
    decoded = []
    real_load = routes.load_image

    def slow_load(data, name=None):
        decoded.append(name)
        time.sleep(1.5)
        return real_load(data, name=name)

    async def scenario():
        async with TestClient(TestServer(app)) as client:
            # a 16000x16000 header: refused from the header, fast, PIL's global limit untouched
            form = aiohttp.FormData({"encoder": "tiny.safetensors", "max_prompts": "4"})
            form.add_field("image", png_header_only(16000, 16000), filename="bomb.png", content_type="image/png")
            t0 = time.perf_counter()
            r = await client.post("/gmi/identify", data=form)
            body = await r.json()
            assert r.status == 400 and "image too large" in body["error"] and time.perf_counter() - t0 < 5
            # too many images: refused before any decode
            monkeypatch.setattr(routes, "load_image", slow_load)
            form = aiohttp.FormData({"encoder": "tiny.safetensors"})
            for i in range(pack_limits.MAX_IMAGES_PER_REQUEST + 1):
                form.add_field("image", _png(), filename=f"{i}.png", content_type="image/png")
            r = await client.post("/gmi/identify", data=form)
            assert r.status == 400 and "at most" in (await r.json())["error"] and decoded == []
            # decoding runs in a worker thread: other requests are answered meanwhile
            form = aiohttp.FormData({"encoder": "tiny.safetensors", "max_prompts": "4"})
            form.add_field("image", _png(), filename="q.png", content_type="image/png")
            slow = asyncio.ensure_future(client.post("/gmi/identify", data=form))
            await asyncio.sleep(0.3)
            t0 = time.perf_counter()
            r = await client.get("/gmi/options")
            assert r.status == 200 and time.perf_counter() - t0 < 1.0 and not slow.done()
            assert (await slow).status == 200
            # a chunked upload (no Content-Length) past the byte limit: 413 while reading
            monkeypatch.setattr(pack_limits, "MAX_UPLOAD_BYTES", 50_000)
            monkeypatch.setattr(pack_limits.ByteCounter.__init__, "__defaults__", (50_000,))

            async def chunks():
                boundary = "XyZ"
                yield f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'.encode()
                for _ in range(40):
                    yield b"\x00" * 4096
                yield f"\r\n--{boundary}--\r\n".encode()

            r = await client.post(
                "/gmi/identify", data=chunks(), headers={"Content-Type": "multipart/form-data; boundary=XyZ"}
            )
            assert r.status == 413, await r.text()

    asyncio.run(scenario())


MALFORMED = [
    ("json_body", {"Content-Type": "application/json"}, b'{"image": "x"}'),
    ("no_content_type", {}, b"abc"),
    ("form_urlencoded", {"Content-Type": "application/x-www-form-urlencoded"}, b"image=abc"),
    ("missing_boundary", {"Content-Type": "multipart/form-data"}, b"--x\r\n\r\n"),
    (
        "truncated_multipart",
        {"Content-Type": "multipart/form-data; boundary=b"},
        b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n\x89PNG',
    ),
    ("garbage_multipart", {"Content-Type": "multipart/form-data; boundary=b"}, b"\x00\xff\x00garbage"),
    ("bad_top_k", None, {"top_k": "abc"}),
    ("negative_top_k", None, {"top_k": "-2"}),
    ("float_max_prompts", None, {"max_prompts": "1.5"}),
    ("unknown_method", None, {"method": "magic"}),
    ("encoder_path", None, {"encoder": "../../../../etc/passwd.safetensors"}),
    ("encoder_model_path", None, {"encoder": "../../x/openai"}),
    ("prompt_set_path", None, {"prompt_set": "../../secret.txt"}),
    ("prompt_set_encoded", None, {"prompt_set": "%2e%2e%2fsecret.txt"}),
    ("huge_field", None, {"prompt": "x" * 5000}),
]


@pytest.mark.parametrize("case", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_faults_numbers_comfyui_malformed_requests_are_4xx_never_500(env, case):  # noqa: F811
    import aiohttp
    from aiohttp.test_utils import TestClient, TestServer

    build(env)
    (env.base / "secret.txt").write_text("a secret prompt\n")
    app = _client(env)
    name, headers, body = case

    async def scenario():
        async with TestClient(TestServer(app)) as client:
            if headers is not None:
                r = await client.post("/gmi/identify", data=body, headers=headers)
            else:
                form = aiohttp.FormData({"encoder": "tiny.safetensors", "max_prompts": "4", **body})
                form.add_field("image", _png(), filename="q.png", content_type="image/png")
                r = await client.post("/gmi/identify", data=form)
            text = await r.text()
            assert 400 <= r.status < 500, (name, r.status, text)
            assert json.loads(text)["error"] and no_server_path(text, env.base)

    asyncio.run(scenario())


BAD_STATUS_QUERIES = [
    "family_settings=steps%3Dabc",
    "family_settings=steps%3D0",
    "family_settings=cfg%3Dnan",
    "family_settings=cfg%3Dinf",
    "family_settings=width%3D65",
    "family_settings=sdxl.width%3D99999",
    "family_settings=sd9.steps%3D3",
    "sampler_name=warp",
    "budget=0x-1",
    "budget=banana",
    "prompt_set=../../secret.txt",
    "encoder=/etc/x.safetensors",
    "max_prompts=1e9",
    "seed=1.5",
]


@pytest.mark.parametrize("q", BAD_STATUS_QUERIES)
def test_faults_numbers_comfyui_status_query_validated(env, q):  # noqa: F811
    from aiohttp.test_utils import TestClient, TestServer

    build(env)
    app = _client(env)

    async def scenario():
        async with TestClient(TestServer(app)) as client:
            r = await client.get("/gmi/status?" + (q if q.startswith("encoder=") else "encoder=tiny.safetensors&" + q))
            text = await r.text()
            assert 400 <= r.status < 500, (q, r.status, text)
            assert no_server_path(text, env.base)
            assert "NaN" not in text

    asyncio.run(scenario())


def test_faults_status_comfyui_route_shows_corrupt_and_no_paths(env):  # noqa: F811
    from aiohttp.test_utils import TestClient, TestServer

    build(env)
    spec = next((env.base / "user" / "gmi" / "specs").glob("*/*.safetensors"))
    spec.write_bytes(spec.read_bytes()[:1000])
    app = _client(env)

    async def scenario():
        async with TestClient(TestServer(app)) as client:
            r = await client.get(
                "/gmi/status?encoder=tiny.safetensors&max_prompts=4&budget=allx2&family_settings=steps%3D3+width%3D64+height%3D64"
            )
            data = await r.json()
            states = sorted(c["state"] for c in data["checkpoints"])
            assert r.status == 200 and states == ["corrupt", "ready", "ready", "ready"], data
            corrupt = next(c for c in data["checkpoints"] if c["state"] == "corrupt")
            assert corrupt["detail"] and no_server_path(json.dumps(data), env.base)

    asyncio.run(scenario())


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"steps": "many", "cfg": "nan", "width": null}'])
def test_faults_cache_comfyui_panel_settings_validated(env, content):  # noqa: F811
    settings = env.nodes.settings
    settings.path().parent.mkdir(parents=True, exist_ok=True)
    settings.path().write_text(content)
    assert settings.load() == settings.DEFAULTS


def _library_client(env, output: Path):  # noqa: F811
    fp = sys.modules["folder_paths"]
    fp.get_output_directory = lambda: str(output)
    fp.get_input_directory = lambda: str(output.parent / "input")
    return _client(env)


LIBRARY_BAD_REQUESTS = [
    ("traversal", {"root": "output", "subfolder": "../.."}),
    ("absolute", {"root": "output", "subfolder": "/etc"}),
    ("encoded", {"root": "output", "subfolder": "%2e%2e/%2e%2e"}),
    ("symlink_out", {"root": "output", "subfolder": "link_out"}),
    ("missing_folder", {"root": "output", "subfolder": "nowhere"}),
    ("unknown_root", {"root": "/etc"}),
    ("root_not_a_string", {"root": ["output"]}),
    ("max_prompts_text", {"max_prompts": "many"}),
    ("max_prompts_negative", {"max_prompts": -3}),
    ("max_prompts_nan", {"max_prompts": float("nan")}),
    ("max_prompts_float", {"max_prompts": 1.5}),
    ("encoder_path", {"encoder": "../../../../etc/x.safetensors"}),
    ("prompt_set_path", {"prompt_set": "../../secret.txt"}),
    ("unknown_field", {"path": "/etc"}),
    ("huge_field", {"subfolder": "x" * 5000}),
]


@pytest.mark.parametrize("case", LIBRARY_BAD_REQUESTS, ids=[c[0] for c in LIBRARY_BAD_REQUESTS])
def test_faults_numbers_comfyui_import_images_bad_requests_are_4xx(env, tmp_path, case):  # noqa: F811
    from aiohttp.test_utils import TestClient, TestServer

    build(env)
    output = env.base / "output"
    output.mkdir()
    (env.base / "secret.txt").write_text("a secret prompt\n")
    (tmp_path / "elsewhere").mkdir(exist_ok=True)
    (output / "link_out").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    app = _library_client(env, output)
    name, fields = case
    specs_before = sorted(p.name for p in (env.base / "user" / "gmi" / "specs").rglob("*.safetensors"))

    async def scenario():
        async with TestClient(TestServer(app)) as client:
            body = json.dumps({"root": "output", "encoder": "tiny.safetensors", **fields})
            r = await client.post("/gmi/import-images", data=body, headers={"Content-Type": "application/json"})
            text = await r.text()
            assert 400 <= r.status < 500, (name, r.status, text)
            assert json.loads(text)["error"] and no_server_path(text, env.base, tmp_path)

    asyncio.run(scenario())
    assert sorted(p.name for p in (env.base / "user" / "gmi" / "specs").rglob("*.safetensors")) == specs_before


def test_faults_numbers_comfyui_library_routes_malformed_and_map(env, tmp_path):  # noqa: F811
    from aiohttp.test_utils import TestClient, TestServer

    build(env)
    output = env.base / "output"
    output.mkdir()
    app = _library_client(env, output)
    pack_limits = sys.modules[env.pack.__name__ + ".gmi_core.limits"]

    async def scenario():
        async with TestClient(TestServer(app)) as client:
            for body, headers in (
                (b"root=output", {"Content-Type": "application/x-www-form-urlencoded"}),
                (b"{not json", {"Content-Type": "application/json"}),
                (b"[1, 2]", {"Content-Type": "application/json"}),
                (b"\xff\xfe", {"Content-Type": "application/json"}),
            ):
                r = await client.post("/gmi/import-images", data=body, headers=headers)
                assert r.status == 400 and (await r.json())["error"], (body, r.status)

            async def chunks():  # no Content-Length: counted as it arrives
                yield b'{"subfolder": "'
                for _ in range(8):
                    yield b"a" * 4096
                yield b'"}'

            pack_limits.MAX_UPLOAD_BYTES = 10_000
            try:
                r = await client.post("/gmi/import-images", data=chunks(), headers={"Content-Type": "application/json"})
                assert r.status == 413, await r.text()
            finally:
                pack_limits.MAX_UPLOAD_BYTES = limits.MAX_UPLOAD_BYTES
            for q in ("max_prompts=abc", "max_prompts=-1", "encoder=/etc/x.safetensors", "prompt_set=../../x"):
                r = await client.get("/gmi/map?" + q)
                text = await r.text()
                assert 400 <= r.status < 500 and no_server_path(text, env.base), (q, r.status, text)
            r = await client.get("/gmi/map?encoder=tiny.safetensors&max_prompts=4")
            data = await r.json()
            assert r.status == 200 and len(data["checkpoints"]) == 4 and "NaN" not in await r.text(), data
            r = await client.post(
                "/gmi/import-images",
                data=json.dumps({"encoder": "tiny.safetensors", "max_prompts": 4}),
                headers={"Content-Type": "application/json"},
            )
            assert r.status == 200 and (await r.json())["scanned"] == 0  # an empty output folder: nothing, no error

    asyncio.run(scenario())
