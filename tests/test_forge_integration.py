"""Round trip inside the REAL Forge (opt-in: GMI_FORGE_DIR=/path/to/stable-diffusion-webui-forge).

The same round trip as tests/test_a1111_integration.py, in Forge on CPU (127.0.0.1, a private --data-dir with gmi
linked in as an extension, --api-auth): small random SD1 checkpoints Forge's own loader accepts
(tests/forge_support/tiny_checkpoints.py), specs built through /gmi/v1/build (Forge's txt2img pipeline), a query
image rendered from each checkpoint with an unseen prompt and seed, identified through /gmi/v1/identify (the
generating checkpoint must rank first), switched to through /gmi/v1/switch (Forge's checkpoint_change), and a txt2img
after the switch, without any override, must reproduce the query image pixel for pixel. Then the auto-select script
(alwayson_scripts), --api-auth on every /gmi/v1/ route, and the GMI tab and settings in the UI config.

Forge's Python: GMI_FORGE_PYTHON, else <forge>/venv/bin/python (docs/forge.md: how it is made).
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

FORGE = os.environ.get("GMI_FORGE_DIR")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not FORGE, reason="set GMI_FORGE_DIR to a stable-diffusion-webui-forge checkout to run it"),
]
REPO = Path(__file__).resolve().parents[1]
CHECKPOINTS = 3  # each is about 0.45 GB (Forge insists on full-size SD1 VAE and CLIP-L shapes)
IMAGES_PER_PROMPT = 2
SPEC_PROMPTS = 4
API_AUTH = "gmi-tester:s3cret-pass"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import torch
    from safetensors.torch import save_file

    from gmi_core.encoders import save_encoder, tiny_encoder
    from gmi_core.prompts import load_prompt_set
    from tests.forge_support.server import forge_python, forge_server

    forge = Path(FORGE).resolve()
    data = tmp_path_factory.mktemp("forge_data")
    models = data / "models" / "Stable-diffusion"
    subprocess.run(
        [
            str(forge_python(forge)),
            str(REPO / "tests" / "forge_support" / "tiny_checkpoints.py"),
            "--forge",
            str(forge),
            "--out",
            str(models),
            "--count",
            str(CHECKPOINTS),
        ],
        check=True,
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"),
    )
    save_file({"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(4, 4)}, str(models / "some_lora.safetensors"))
    encoder = save_encoder(tiny_encoder(0), data / "models" / "gmi" / "clip" / "gmi-tiny.safetensors")
    prompts = data / "models" / "gmi" / "prompt_sets" / "spec_prompts.json"
    prompts.parent.mkdir(parents=True)
    prompts.write_text(json.dumps(list(load_prompt_set("platform").prompts[:SPEC_PROMPTS])))
    srv = forge_server(forge, data, REPO, api_auth=API_AUTH)
    try:
        srv.start()
        srv.settings = {
            "gmi_encoder": str(encoder),
            "gmi_prompt_set": prompts.name,
            "gmi_budget": f"allx{IMAGES_PER_PROMPT}",
            "gmi_sd1_steps": 3,
            "gmi_sd1_width": 64,
            "gmi_sd1_height": 64,
            "gmi_sampler": "Euler",
            # Forge selects the first file of the folder at start-up, which would be the LoRA here
            "sd_model_checkpoint": "tiny_sd1_0.safetensors",
        }
        yield srv
    finally:
        srv.stop()
        print(f"\n--- Forge log tail ({srv.log_path}) ---\n{srv.tail(25)}")


def txt2img(server, prompt, seed, checkpoint=None, **extra):
    body = {
        "prompt": prompt,
        "seed": seed,
        "steps": 3,
        "width": 64,
        "height": 64,
        "sampler_name": "Euler",
        "scheduler": "Automatic",
        "batch_size": 1,
    }
    if checkpoint:
        body["override_settings"] = {"sd_model_checkpoint": checkpoint}
    body.update(extra)
    _, out = server.post("/sdapi/v1/txt2img", body)
    return out["images"][0], json.loads(out["info"])


def pixels(image_b64: str):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(image_b64.split(",", 1)[-1]))).convert("RGB"))


def test_roundtrip_in_real_forge(server):
    from gmi_core.prompts import load_prompt_set

    t0 = time.time()
    server.post("/sdapi/v1/options", server.settings)  # Settings > GMI, as a user would set them
    # Forge's GET /sdapi/v1/options leaves out extension options (its response model is made before they exist),
    # so gmi's own status says what it uses
    specs = server.specs()  # once the encoder is loaded
    assert specs["config"]["budget"] == f"allx{IMAGES_PER_PROMPT}"
    assert specs["config"]["encoder"] == "gmi/clip/gmi-tiny.safetensors"  # relative to models/: no server path
    assert specs["family_settings"]["sd1"]["steps"] == 3 and specs["family_settings"]["sd1"]["width"] == 64
    names = [c["name"] for c in specs["checkpoints"]]
    assert names == [f"tiny_sd1_{i}.safetensors" for i in range(CHECKPOINTS)]
    assert all(c["state"] == "missing" and c["family"] == "sd1" for c in specs["checkpoints"])
    assert [s["name"] for s in specs["skipped"]] == ["some_lora.safetensors"]

    code, bad = server.post("/gmi/v1/build", {"checkpoints": ["../../etc/passwd"]}, expect_error=True)
    assert code == 404, bad
    job = server.build_specs("missing")
    assert job["state"] == "done", job
    assert job["report"]["built"] == names and not job["report"]["failed"]
    print(f"\nbuild: {job['state']} in {job['finished'] - job['started']:.1f}s, built {job['report']['built']}")
    _, specs = server.get("/gmi/v1/specs")
    assert all(c["state"] == "ready" and c["prompts_done"] == SPEC_PROMPTS for c in specs["checkpoints"])
    titles = {c["name"]: c["title"] for c in specs["checkpoints"]}

    spec_prompts = set(load_prompt_set("platform").prompts[:SPEC_PROMPTS])
    eval_prompts = [p for p in load_prompt_set("evaluation").prompts if p not in spec_prompts]
    # query from each checkpoint in turn, so that every switch is a real change of Forge's selection
    for i, name in enumerate(names[1:] + names[:1]):
        prompt, seed = eval_prompts[i], 900_001 + i
        image, info = txt2img(server, prompt, seed, titles[name])
        assert info["sd_model_name"] == name.removesuffix(".safetensors")
        _, result = server.post("/gmi/v1/identify", {"image": image, "top_k": CHECKPOINTS})
        ranking = [(r["name"], round(r["score"], 4)) for r in result["ranking"]]
        print(f"query from {name} ({prompt!r}, seed {seed}): ranking {ranking}")
        assert result["ranking"][0]["name"] == name
        assert len(result["ranking"]) == CHECKPOINTS

        _, switched = server.post("/gmi/v1/switch", {"checkpoint": result["ranking"][0]["title"]})
        assert switched["title"] == switched["selected"] == titles[name]
        _, options = server.get("/sdapi/v1/options")
        assert options["sd_model_checkpoint"] == name  # as Forge's own dropdown names it

        again, info = txt2img(server, prompt, seed)  # no override: Forge renders with what the switch selected
        assert info["sd_model_name"] == name.removesuffix(".safetensors")
        assert (pixels(again) == pixels(image)).all(), f"the render after switching to {name} differs"
    print(f"switch: /sdapi/v1/options sd_model_checkpoint = {options['sd_model_checkpoint']!r}; renders reproduced")

    # auto-select: the option says tiny_sd1_0, the reference image comes from tiny_sd1_2
    server.post("/sdapi/v1/options", {"sd_model_checkpoint": names[0]})
    reference, _ = txt2img(server, eval_prompts[-1], 424_242, titles[names[2]])
    _, info = txt2img(
        server,
        "a castle on a hill",
        5,
        alwayson_scripts={"gmi auto-select checkpoint": {"args": [True, reference, ""]}},
    )
    print(f"auto-select infotext: {info['infotexts'][0]}")
    assert info["sd_model_name"] == "tiny_sd1_2"
    assert f"GMI auto-select: {names[2]} [" in info["infotexts"][0]
    _, options = server.get("/sdapi/v1/options")
    assert options["sd_model_checkpoint"] == names[0]  # a per-generation override, like Forge's own

    assert server.post("/gmi/v1/identify", {"image": "not base64!"}, expect_error=True)[0] == 422
    assert server.post("/gmi/v1/switch", {"checkpoint": "/etc/passwd"}, expect_error=True)[0] == 404
    code, _ = server.post(
        "/gmi/v1/switch", {"checkpoint": names[1], "modules": ["../../etc/passwd"]}, expect_error=True
    )
    assert code == 404
    print(f"round trip passed in {time.time() - t0:.1f}s after start-up")


def test_api_auth_protects_gmi_routes_like_sdapi(server):
    """--api-auth: without the credentials every /gmi/v1/ route answers 401, exactly as /sdapi/v1/ does."""
    calls = [
        ("GET", "/gmi/v1/specs", None),
        ("GET", "/gmi/v1/build", None),
        ("POST", "/gmi/v1/build", {"checkpoints": "all"}),
        ("POST", "/gmi/v1/identify", {"image": "AAAA"}),
        ("POST", "/gmi/v1/interrogate", {"image": "AAAA"}),
        ("POST", "/gmi/v1/switch", {"checkpoint": "tiny_sd1_1.safetensors"}),
        ("GET", "/sdapi/v1/options", None),
    ]
    user, password = API_AUTH.split(":")
    for method, path, body in calls:
        for credentials in ("", f"{user}:wrong", f"nobody:{password}"):
            code, answer = server.request(method, path, body, expect_error=True, credentials=credentials)
            assert code == 401, (method, path, credentials, code, answer)
    code, specs = server.get("/gmi/v1/specs")
    assert code == 200 and len(specs["checkpoints"]) == CHECKPOINTS
    print(f"\n--api-auth: {len(calls) * 3} unauthenticated requests answered 401; with credentials 200")


def test_gmi_tab_and_settings_are_in_the_ui(server):
    _, config = server.get("/config")
    text = json.dumps(config)
    for elem in ("gmi_identify", "gmi_build", "gmi_use", "gmi_modules", "gmi_autoselect_enabled"):
        assert elem in text, elem
    assert "GMI (checkpoint identification)" in text
    log = server.log_path.read_text(errors="replace")
    assert "Error loading script: gmi" not in log and "Error executing callback" not in log


def test_install_py_as_forge_runs_it(tmp_path):
    """Forge runs ``python install.py`` with its root on PYTHONPATH: with everything present it says nothing; a
    missing requirement goes through Forge's own ``launch.run_pip``, which --skip-install turns off."""
    from tests.forge_support.server import forge_python

    forge = Path(FORGE).resolve()
    env = dict(os.environ, PYTHONPATH=str(forge), HF_HUB_OFFLINE="1")
    quiet = subprocess.run(
        [str(forge_python(forge)), str(REPO / "install.py")], cwd=forge, env=env, capture_output=True, text=True
    )
    assert quiet.returncode == 0 and quiet.stdout.strip() == "", quiet.stdout + quiet.stderr

    requirements = tmp_path / "requirements.txt"
    requirements.write_text("gmi-surely-not-installed==1.0\n")
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); import install, launch; "
        "install.REQUIREMENTS = install.Path(sys.argv[2]); "
        "assert install.webui_launch() is launch and hasattr(launch, 'run_pip'); install.install(['--skip-install'])"
    )
    skipped = subprocess.run(
        [str(forge_python(forge)), "-c", script, str(REPO), str(requirements)],
        cwd=forge,
        env=env,
        capture_output=True,
        text=True,
    )
    assert skipped.returncode == 0, skipped.stderr[-2000:]
    assert "gmi: --skip-install, not installing: gmi-surely-not-installed==1.0" in skipped.stdout
