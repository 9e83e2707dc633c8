"""Class 8 (issue 18): bodies parsed with bounds. A multipart body's parts are counted as they arrive (at most
limits.MAX_FORM_FIELDS, as ComfyUI's own upload), a JSON body's nesting is bounded before any parser recurses
(limits.check_json_depth): 4xx, never a stall or a 500 RecursionError; in ComfyUI and A1111 (fake WebUI)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import torch

from gmi_core import limits
from gmi_core.errors import InvalidInput
from tests.test_a1111_adapter import encoder_file, gmi, webui, world  # noqa: F401 - fixtures and helpers
from tests.test_a1111_faults import a1111_app, a1111_world  # noqa: F401 - fixtures
from tests.test_comfyui_nodes import build, env  # noqa: F401 - the fixture

torch.set_num_threads(1)
DEEP = b"[" * 100_000 + b"]" * 100_000
DEEP_OBJECT = b'{"a":' * 50_000 + b"1" + b"}" * 50_000


@pytest.mark.parametrize(
    "body",
    [b"[]", b'{"a": [[[1]]]}', b'"' + b"[" * 500 + b'"', b'["\\\\", "\\"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["]'],
)
def test_body_bounds_shallow_json_passes(body):
    limits.check_json_depth(body)
    json.loads(body)


@pytest.mark.parametrize("body", [DEEP, DEEP_OBJECT, b'["x", ' + b"[" * (limits.MAX_JSON_DEPTH + 1)])
def test_body_bounds_deep_json_is_refused_before_parsing(body):
    with pytest.raises(InvalidInput, match="nested deeper"):
        limits.check_json_depth(body)


def _many_fields(count: int) -> tuple[bytes, str]:
    boundary = "gmiboundary"
    part = f'--{boundary}\r\nContent-Disposition: form-data; name="x"\r\n\r\n\r\n'.encode()
    return part * count + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_body_bounds_comfyui_many_fields_and_deep_json_are_4xx_fast(env):  # noqa: F811
    from aiohttp.test_utils import TestClient, TestServer

    from tests.test_comfyui_faults import _library_client

    build(env)
    output = env.base / "output"
    output.mkdir()
    app = _library_client(env, output)
    body, content_type = _many_fields(20_000)

    async def scenario():
        async with TestClient(TestServer(app)) as client:
            started = time.monotonic()
            r = await client.post("/gmi/identify", data=body, headers={"Content-Type": content_type})
            assert r.status == 400 and "more than 1000 fields" in (await r.json())["error"], await r.text()
            assert time.monotonic() - started < 10  # was ~55 s, and every other request stalled with it
            r = await client.get("/gmi/defaults")  # the server still answers
            assert r.status == 200
            for deep in (DEEP, DEEP_OBJECT):
                r = await client.post("/gmi/import-images", data=deep, headers={"Content-Type": "application/json"})
                assert r.status == 400 and "nested deeper" in (await r.json())["error"], await r.text()

    asyncio.run(scenario())


@pytest.mark.parametrize("path", ["/gmi/v1/identify", "/gmi/v1/build", "/gmi/v1/switch", "/gmi/v1/import-images"])
def test_body_bounds_a1111_deep_json_is_4xx_not_500(a1111_app, path):  # noqa: F811
    client, webui_world = a1111_app
    r = client.post(path, content=DEEP, headers={"content-type": "application/json"})
    assert r.status_code == 422 and "nested deeper" in r.json()["detail"], (r.status_code, r.text[:200])
    assert webui_world.process_calls == []
