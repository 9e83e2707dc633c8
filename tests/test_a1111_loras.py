"""LoRA specs inside the REAL Automatic1111 WebUI (opt-in: GMI_A1111_DIR=/path/to/stable-diffusion-webui).

Tiny random kohya LoRAs (gmi_core.tiny_lora) for a tiny SD1 checkpoint go into the WebUI's Lora folder; with
Settings > GMI "gmi_models" = loras, /gmi/v1/specs lists them as LoRA rows, /gmi/v1/build renders them through the
WebUI's txt2img with ``<lora:name:w>`` (the built-in Lora network), and a txt2img with the tag at a spec cell's prompt
and seed reproduces the spec image and is identified as that row.
"""

from __future__ import annotations

import base64
import io
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.test_a1111_integration import API_AUTH, REPO, txt2img

WEBUI = os.environ.get("GMI_A1111_DIR")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not WEBUI, reason="set GMI_A1111_DIR to a stable-diffusion-webui checkout to run it"),
]
SPEC_PROMPTS, IMAGES_PER_PROMPT = 2, 2


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import json

    from gmi_core.encoders import save_encoder, tiny_encoder
    from gmi_core.prompts import load_prompt_set
    from gmi_core.tiny_lora import write_lora_for_checkpoint
    from tests.a1111_support.server import WebuiServer, webui_python

    webui = Path(WEBUI).resolve()
    data = tmp_path_factory.mktemp("a1111_lora_data")
    models = data / "models" / "Stable-diffusion"
    script = REPO / "tests" / "a1111_support" / "tiny_checkpoints.py"
    command = [str(webui_python(webui)), str(script), "--webui", str(webui), "--out", str(models), "--count", "1"]
    command += ["--text-encoder-dir", str(data / "tiny_clip_text")]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    checkpoint = next(models.glob("*.safetensors"))
    for i in range(2):
        write_lora_for_checkpoint(data / "models" / "Lora" / f"tiny-lora-{i}.safetensors", checkpoint, seed=700 + i)
    encoder = save_encoder(tiny_encoder(0), data / "models" / "gmi" / "clip" / "gmi-tiny.safetensors")
    prompts = data / "models" / "gmi" / "prompt_sets" / "spec_prompts.json"
    prompts.parent.mkdir(parents=True)
    prompts.write_text(json.dumps(list(load_prompt_set("platform").prompts[:SPEC_PROMPTS])))
    srv = WebuiServer(webui, data, REPO, data / "webui.log", api_auth=API_AUTH)
    try:
        srv.start()
        deadline = time.time() + 300
        while srv.get("/gmi/v1/specs", expect_error=True)[0] == 404 and time.time() < deadline:
            time.sleep(1)  # start() returns on the first answer; gmi's routes come with app_started, a bit later
        srv.post(
            "/sdapi/v1/options",
            {
                "gmi_encoder": str(encoder),
                "gmi_prompt_set": prompts.name,
                "gmi_budget": f"allx{IMAGES_PER_PROMPT}",
                "gmi_sd1_steps": 3,
                "gmi_sd1_width": 64,
                "gmi_sd1_height": 64,
                "gmi_sampler": "Euler",
                "gmi_models": "both",
                "gmi_lora_strengths": "1; tiny-lora-1=0.5,1",
            },
        )
        yield srv, checkpoint.name
    finally:
        srv.stop()
        print(f"\n--- WebUI log tail ({srv.log_path}) ---\n{srv.tail(25)}")


def test_lora_specs_build_and_a_tagged_render_is_identified(server):
    from PIL import Image

    from gmi_core.budgets import cell_seed
    from gmi_core.prompts import load_prompt_set

    srv, base = server
    _, specs = srv.get("/gmi/v1/specs")
    kinds = {c["name"]: c["model_kind"] for c in specs["checkpoints"]}
    lora_rows = [f"tiny-lora-{i} @ 1 on {base}" for i in range(2)]  # the WebUI names LoRAs by their stem
    half = f"tiny-lora-1 @ 0.5 on {base}"
    assert kinds == {base: "checkpoint", **dict.fromkeys([*lora_rows, half], "lora")}, specs
    job = srv.build_specs("missing")
    assert job["state"] == "done" and sorted(job["report"]["built"]) == sorted([base, *lora_rows, half]), job
    _, specs = srv.get("/gmi/v1/specs")
    assert all(c["state"] == "ready" for c in specs["checkpoints"])
    title = next(c["title"] for c in specs["checkpoints"] if c["name"] == base)

    prompt = load_prompt_set("platform").prompts[1]
    seed = cell_seed(0, 1, 1)  # a spec cell: on tiny random models only the same cell ties a render to its row
    for row, tag in zip(lora_rows, ("<lora:tiny-lora-0:1>", "<lora:tiny-lora-1:1>"), strict=True):
        image, info = txt2img(srv, f"{prompt} {tag}", seed, title)
        assert "Lora hashes" in info["infotexts"][0]  # the WebUI applied the LoRA
        _, result = srv.post("/gmi/v1/identify", {"image": image, "prompt": prompt, "top_k": 3})
        best = result["ranking"][0]
        assert best["name"] == row and best["model_kind"] == "lora", result["ranking"]
        plain, _ = txt2img(srv, prompt, seed, title)
        pixels = [Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB").tobytes() for b in (image, plain)]
        assert pixels[0] != pixels[1]  # the tag changed the render
