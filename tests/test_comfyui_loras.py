"""LoRA specs inside real ComfyUI: built with ComfyUI's own LoRA loader, resumed after an interrupt, and identified;
the Identify node's MODEL/CLIP/VAE re-render pixel-identically to the host's base + LoraLoader at that strength.

Tiny random kohya LoRA files for the tiny SD1 checkpoints are written at test time (gmi_core.tiny_lora).
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfyui_support import browser, comfy_env
from comfyui_support.workflows import build_specs_prompt

pytestmark = pytest.mark.slow

ENCODER_FILE = "gmi-tiny-clip.safetensors"
MAX_PROMPTS, IMAGES, STEPS, SIZE = 4, 2, 4, 64
LORA_STRENGTHS = "1\nlora-2=0.5,1"  # lora-2 at two strengths: four LoRA specs on tiny-0


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(comfy_env.REPO))
    from gmi_core.tiny_lora import write_lora_for_checkpoint

    comfy_dir, base, names = comfy_env.tiny_base(tmp_path_factory.mktemp("comfy-lora"), 2, ENCODER_FILE)
    checkpoint = (base / "models" / "checkpoints" / names[0]).resolve()
    for i in range(3):
        write_lora_for_checkpoint(base / "models" / "loras" / f"lora-{i}.safetensors", checkpoint, seed=300 + i)
    server = comfy_env.ComfyServer(comfy_dir, base, log_path=comfy_env.CACHE / "last-comfyui-loras.log")
    server.start()
    try:
        yield server, names
    finally:
        server.stop()


def build_prompt(models: str = "loras") -> dict:
    return build_specs_prompt(
        ENCODER_FILE, MAX_PROMPTS, IMAGES, STEPS, SIZE, models=models, lora_strengths=LORA_STRENGTHS, lora_bases=""
    )


def lora_query_prompt(ckpt: str, lora: str, strength: float, text: str, seed: int, tag: str) -> dict:
    """Render with the host's base + LoraLoader; identify it; replay with Identify's MODEL/CLIP/VAE."""
    sampler = {"seed": seed, "steps": STEPS, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}
    lat = {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}}

    def render(model, clip, vae, prefix):
        return {
            f"pos{prefix}": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": clip}},
            f"neg{prefix}": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": clip}},
            f"ks{prefix}": {
                "class_type": "KSampler",
                "inputs": {
                    "model": model,
                    "positive": [f"pos{prefix}", 0],
                    "negative": [f"neg{prefix}", 0],
                    "latent_image": ["lat", 0],
                    **sampler,
                },
            },
            f"dec{prefix}": {"class_type": "VAEDecode", "inputs": {"samples": [f"ks{prefix}", 0], "vae": vae}},
            f"save{prefix}": {
                "class_type": "SaveImage",
                "inputs": {"images": [f"dec{prefix}", 0], "filename_prefix": f"{prefix}_{tag}"},
            },
        }

    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "lora": {
            "class_type": "LoraLoader",
            "inputs": {
                "model": ["ckpt", 0],
                "clip": ["ckpt", 1],
                "lora_name": lora,
                "strength_model": strength,
                "strength_clip": strength,
            },
        },
        "lat": lat,
        **render(["lora", 0], ["lora", 1], ["ckpt", 2], "query"),
        "enc": {"class_type": "GMILoadEncoder", "inputs": {"encoder": ENCODER_FILE, "allow_download": False}},
        "id": {
            "class_type": "GMIIdentify",
            "inputs": {
                "encoder": ["enc", 0],
                "image": ["decquery", 0],
                "method": "gmi",
                "top_k": 0,
                "pick_rank": 1,
                "prompt": text,
                "prompt_set": "platform",
                "max_prompts": MAX_PROMPTS,
                "models": "both",
            },
        },
        **render(["id", 0], ["id", 1], ["id", 2], "replay"),
    }


def saved_image(server, entry, node) -> np.ndarray:
    from PIL import Image

    info = entry["outputs"][node]["images"][0]
    return np.asarray(Image.open(server.base / "output" / info.get("subfolder", "") / info["filename"]).convert("RGB"))


def lora_specs(server) -> dict:
    """{model name: (spec file, spec)} of the LoRA specs in ComfyUI's gmi store."""
    from gmi_core.spec import Spec

    found = {}
    for path in (server.base / "user" / "gmi" / "specs").glob("*/*.safetensors"):
        spec = Spec.load(path)
        if spec.extra.get("model", {}).get("kind") == "lora":
            found[spec.checkpoint_name] = (path, spec)
    return found


def test_lora_specs_build_resume_identify_and_replay(comfy):
    server, names = comfy
    from gmi_core.budgets import cell_seed
    from gmi_core.prompts import load_prompt_set

    expected = [f"lora-{i}.safetensors @ 1 on {names[0]}" for i in range(3)]
    expected.insert(2, f"lora-2.safetensors @ 0.5 on {names[0]}")

    # interrupted while the second LoRA spec renders: the first is kept, the second keeps its finished prompts
    queued = server.post_json("/prompt", {"prompt": build_prompt(), "client_id": "gmi-test"})
    deadline = time.time() + 300
    while expected[1] not in lora_specs(server) and time.time() < deadline:
        time.sleep(0.05)
    request = urllib.request.Request(server.url + "/interrupt", b"{}", {"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=30).close()  # ComfyUI's Cancel button
    while queued["prompt_id"] not in server.get(f"/history/{queued['prompt_id']}") and time.time() < deadline:
        time.sleep(0.2)
    before = lora_specs(server)
    assert before[expected[0]][1].complete and not before[expected[1]][1].complete, "interrupt came too late"
    first_stamp = before[expected[0]][0].stat().st_mtime_ns
    kept = before[expected[1]][1]

    report = server.run_prompt(build_prompt(), timeout=600)["outputs"]["build"]["gmi_build"][0]
    assert sorted(report["built"]) == sorted(expected[1:]) and not report["failed"], report  # not the finished one
    after = lora_specs(server)
    assert all(spec.complete for _, spec in after.values()) and sorted(after) == sorted(expected)
    assert after[expected[0]][0].stat().st_mtime_ns == first_stamp  # the finished spec was not rendered again
    done = kept.image_done
    assert (after[expected[1]][1].image_features[done] == kept.image_features[done]).all()
    assert "lora key not loaded" not in server.log()  # every module of the tiny LoRA reached ComfyUI's model

    # checkpoint specs too, so the ranking mixes both kinds
    server.run_prompt(build_prompt("checkpoints"), timeout=600)
    prompts = load_prompt_set("platform").prompts
    for name in (expected[0], expected[2]):
        lora, strength = name.split(" @ ")[0], float(name.split(" @ ")[1].split(" ")[0])
        index = 1
        text, seed = prompts[index], cell_seed(0, index, 1)  # a spec cell: see tests/test_loras.py
        entry = server.run_prompt(lora_query_prompt(names[0], lora, strength, text, seed, lora[:6]), timeout=300)
        outputs = entry["outputs"]["id"]
        ranking = outputs["gmi_ranking"][0]["ranking"]
        assert ranking[0]["name"] == name, json.dumps(ranking, indent=1)[:2000]
        assert ranking[0]["model_kind"] == "lora" and ranking[0]["lora"]["strength"] == strength
        assert {r["model_kind"] for r in ranking} == {"lora", "checkpoint"}
        query, replay = saved_image(server, entry, "savequery"), saved_image(server, entry, "savereplay")
        assert np.array_equal(query, replay)  # Identify's outputs are base + LoraLoader at that strength
    plain = saved_image(server, entry, "savequery")
    entry = server.run_prompt(lora_query_prompt(names[0], "lora-0.safetensors", 0.0, text, seed, "zero"), timeout=300)
    assert np.abs(saved_image(server, entry, "savequery").astype(int) - plain.astype(int)).mean() > 2  # LoRAs matter


@contextmanager
def gmi_events(server):
    """The gmi.* messages ComfyUI broadcasts on its websocket while the block runs (the panel listens to them)."""
    import asyncio
    import threading

    import aiohttp

    seen, ready, stop = [], threading.Event(), threading.Event()

    async def listen():
        url = f"{server.url.replace('http', 'ws')}/ws?clientId=gmi-events"
        async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
            ready.set()
            while not stop.is_set():
                try:
                    message = await ws.receive(timeout=0.5)
                except asyncio.TimeoutError:
                    continue
                if message.type == aiohttp.WSMsgType.TEXT:
                    data = json.loads(message.data)
                    if str(data.get("type", "")).startswith("gmi."):
                        seen.append(data)

    thread = threading.Thread(target=asyncio.run, args=(listen(),), daemon=True)
    thread.start()
    assert ready.wait(30), "no websocket"
    try:
        yield seen
    finally:
        stop.set()
        thread.join(30)


def panel_rows(server, models: str) -> dict:
    return {row["name"]: row for row in server.get(f"/gmi/status?models={models}", timeout=300)["checkpoints"]}


def test_panel_status_and_build_missing_list_lora_specs(comfy):
    """The GMI panel with LoRAs: /gmi/status lists each LoRA spec with its base and strength (filter models =
    checkpoints / loras / both), and its "Build missing specs" (the Build node queued with GET /gmi/options'
    build_inputs and the panel's filter) builds the LoRA the user just added, with progress and ETA per LoRA."""
    server, names = comfy
    server.run_prompt(build_prompt("both"), timeout=900)  # this module's specs (after the test above: none to build)
    added = server.base / "models" / "loras" / "lora-new.safetensors"
    from gmi_core.tiny_lora import write_lora_for_checkpoint

    write_lora_for_checkpoint(added, (server.base / "models" / "checkpoints" / names[0]).resolve(), seed=399)
    new = f"lora-new.safetensors @ 1 on {names[0]}"
    try:
        loras = panel_rows(server, "loras")
        built = [f"lora-{i}.safetensors @ 1 on {names[0]}" for i in range(3)] + [
            f"lora-2.safetensors @ 0.5 on {names[0]}"
        ]
        assert sorted(loras) == sorted([*built, new]), sorted(loras)
        assert all(r["model_kind"] == "lora" and r["lora"]["base_name"] == names[0] for r in loras.values())
        assert loras[f"lora-2.safetensors @ 0.5 on {names[0]}"]["lora"]["strength"] == 0.5
        assert loras[new]["state"] == "missing" and loras[new]["lora"]["strength"] == 1
        assert {loras[name]["state"] for name in built} == {"ready"}
        checkpoints = panel_rows(server, "checkpoints")
        assert sorted(checkpoints) == sorted(names) and {r["model_kind"] for r in checkpoints.values()} == {
            "checkpoint"
        }
        assert panel_rows(server, "both").keys() == {*loras, *checkpoints}  # the panel's default filter
        with pytest.raises(urllib.error.HTTPError) as refused:
            server.get("/gmi/status?models=everything")
        assert refused.value.code == 400 and b"models must be one of" in refused.value.read()

        options = server.get("/gmi/options")  # what the panel's "Build missing specs" queues (web/gmi.js buildPrompt)
        panel_prompt = {
            "gmi_encoder": {
                "class_type": "GMILoadEncoder",
                "inputs": {"encoder": options["config"]["encoder"], "allow_download": False},
            },
            "gmi_build": {
                "class_type": "GMIBuildSpecs",
                "inputs": {**options["build_inputs"], "models": "both", "encoder": ["gmi_encoder", 0]},
            },
        }
        with gmi_events(server) as seen:
            entry = server.run_prompt(panel_prompt, timeout=600)
        report = entry["outputs"]["gmi_build"]["gmi_build"][0]
        assert report["built"] == [new] and not report["failed"], report
        progress = [m["data"] for m in seen if m["type"] == "gmi.build.progress"]
        assert progress and {p["checkpoint"] for p in progress} == {new}, seen[:3]
        assert progress[-1]["images_rendered"] == progress[-1]["images_planned"] == MAX_PROMPTS * IMAGES
        assert all(p["eta"] for p in progress) and progress[-1]["count"] == 1
        row = panel_rows(server, "loras")[new]
        assert row["state"] == "ready" and row["images_done"] == MAX_PROMPTS * IMAGES
    finally:
        added.unlink()


@pytest.mark.skipif(browser.missing() is not None, reason=browser.missing() or "")
def test_sidebar_filters_lora_rows_and_builds_a_missing_lora(comfy):
    """In real Chromium: the GMI sidebar lists LoRA specs as "LoRA @ strength" with their base; its filter shows
    checkpoints or LoRAs only; with "LoRAs" chosen, "Build missing specs" builds a LoRA the user just added."""
    server, names = comfy
    server.run_prompt(build_prompt("both"), timeout=900)  # alone: this module's specs and the panel's settings
    lora_rows = (
        "[...document.querySelectorAll('.gmi-panel .gmi-spec-row')].filter(r => r.querySelector('.gmi-lora-base'))"
    )
    with browser.comfy_page(server.url) as (page, errors):
        page.locator(".gmi-tab-button").click()
        page.wait_for_function(f"{lora_rows}.length === 4")  # three LoRAs, one at two strengths
        texts = page.evaluate(f"{lora_rows}.map(r => r.cells[0].innerText.replace(/\\s+/g, ' '))")
        assert f"lora-2.safetensors @ 0.5 LoRA on {names[0]}" in texts, texts
        select = page.locator(".gmi-panel select.gmi-models")
        select.select_option("checkpoints")
        page.wait_for_function(f"{lora_rows}.length === 0 && document.querySelectorAll('.gmi-spec-row').length === 2")
        assert page.evaluate("app.extensionManager.setting.get('gmi.Panel.Models')") == "checkpoints"
        select.select_option("loras")
        added = server.base / "models" / "loras" / "lora-panel.safetensors"
        from gmi_core.tiny_lora import write_lora_for_checkpoint

        write_lora_for_checkpoint(added, (server.base / "models" / "checkpoints" / names[0]).resolve(), seed=398)
        try:
            page.locator(".gmi-panel button", has_text="Refresh").click()
            page.wait_for_function(
                f"{lora_rows}.length === 5 && {lora_rows}.length === document.querySelectorAll('.gmi-spec-row').length"
            )
            page.locator(".gmi-panel .gmi-build-missing").click()
            page.wait_for_function(
                "/^built 1/.test(document.querySelector('.gmi-panel .gmi-build-status').textContent)"
            )
            page.wait_for_function(f"{lora_rows}.every(r => r.cells[1].textContent === 'ready')")
        finally:
            added.unlink()
            page.evaluate("app.extensionManager.setting.set('gmi.Panel.Models', 'both')")
        assert not [e for e in errors if "gmi" in e.lower()], errors
