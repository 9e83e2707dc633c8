"""Every model family from a header-only safetensors file (key names and the shapes detection reads; tiny tensors
elsewhere), single-file and split layouts; each family's recipe; split-model components; the diffusers runner's
honest skip reasons."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from gmi_core import components
from gmi_core.checkpoints import FolderCheckpointSource, inspect_model, list_checkpoint_files, renders_sd_single_files
from gmi_core.errors import CheckpointError, InvalidInput
from gmi_core.families import FAMILIES, RECIPES, FamilySettings, parse_overrides
from gmi_core.protocols import CheckpointInfo, GenerationSettings

UNET = "model.diffusion_model."
CLIP_L = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
VAE = "first_stage_model.decoder.conv_in.weight"


def unet(context: int, in_channels: int = 4, extra=()) -> dict:
    keys = {
        "input_blocks.0.0.weight": (1, in_channels, 1, 1),
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (1, context),
    }
    keys.update({k: (1,) for k in extra})
    return keys


def mmdit() -> dict:
    return {"joint_blocks.0.context_block.attn.qkv.weight": (1,), "x_embedder.proj.weight": (1, 16, 1, 1)}


def flux(in_channels: int = 64, guidance: bool = True, extra=()) -> dict:
    keys = {"double_blocks.0.img_attn.norm.key_norm.scale": (1,), "img_in.weight": (1, in_channels)}
    if guidance:
        keys["guidance_in.in_layer.weight"] = (1,)
    keys.update({k: (1,) for k in extra})
    return keys


def single(model: dict, *others: str) -> dict:
    out = {UNET + k: v for k, v in model.items()}
    out.update({k: (1,) for k in others})
    return out


def write(path, shapes: dict, metadata=None, tensors=None):
    state = {k: torch.zeros(shape, dtype=torch.float16) for k, shape in shapes.items()}
    state.update(tensors or {})
    save_file(state, str(path), metadata=metadata)
    return path


SD3_SINGLE = ("text_encoders.clip_l.transformer.text_model.final_layer_norm.weight", "vae.decoder.conv_in.weight")
FLUX_SINGLE = ("text_encoders.t5xxl.transformer.encoder.final_layer_norm.weight", "vae.decoder.conv_in.weight")
CASES = {  # file stem: (shapes, family, layout)
    "sd1": (single(unet(768), CLIP_L, VAE), "sd1", "single"),
    "sd1-split": (unet(768), "sd1", "split"),
    "sd2": (single(unet(1024), "cond_stage_model.model.x", VAE), "sd2", "single"),
    "sd2-split": (unet(1024), "sd2", "split"),
    "sdxl": (single(unet(2048), "conditioner.embedders.0.transformer.x", VAE), "sdxl", "single"),
    "sdxl-split": (unet(2048, extra=["label_emb.0.0.weight"]), "sdxl", "split"),
    "sd3": (single(mmdit(), *SD3_SINGLE), "sd3", "single"),
    "sd3-split": (mmdit(), "sd3", "split"),
    "sd3-prefixed-no-vae": (single(mmdit()), "sd3", "split"),
    "flux-dev": (single(flux(), *FLUX_SINGLE), "flux-dev", "single"),
    "flux-dev-split": (flux(), "flux-dev", "split"),
    "flux-schnell-split": (flux(guidance=False), "flux-schnell", "split"),
    "chroma-split": (flux(guidance=False, extra=["distilled_guidance_layer.in_proj.weight"]), "chroma", "split"),
    "other": (single({"cap_embedder.1.weight": (1,)}, *SD3_SINGLE), "other", "single"),
}
SKIPS = {  # file stem: (shapes, words of the reason)
    "sdxl-refiner": (single(unet(1280), "conditioner.embedders.0.model.x", VAE), "refiner"),
    "sdxl-refiner-split": (unet(1280), "refiner"),
    "sd1-inpaint": (single(unet(768, in_channels=9), CLIP_L, VAE), "inpainting"),
    "flux-fill": (flux(in_channels=384), "Fill"),
    "flux-depth": (flux(in_channels=128), "Depth/Canny"),
    "lora": ({"lora_unet_down.lora_down.weight": (1,)}, "LoRA"),
    "vae": ({"decoder.conv_in.weight": (1, 16, 1, 1)}, "VAE"),
    "clip": ({"text_model.encoder.layers.0.mlp.fc1.weight": (1,)}, "text encoder"),
}


def everything_renders(found, path):
    return found


def test_every_family_and_layout_from_the_header_alone(tmp_path):
    for stem, (shapes, family, layout) in CASES.items():
        found = inspect_model(write(tmp_path / f"{stem}.safetensors", shapes))
        assert (found.family, found.layout, found.reason) == (family, layout, None), stem
    for stem, (shapes, words) in SKIPS.items():
        found = inspect_model(write(tmp_path / f"{stem}.safetensors", shapes))
        assert found.family is None and words in found.reason, (stem, found)
    covered = {family for _, family, _ in CASES.values()} | {"sd2-v"}
    assert covered == set(FAMILIES)


def test_sd2_768_v_in_both_layouts(tmp_path):
    spread = torch.randn(1280, generator=torch.Generator().manual_seed(0)) * 0.2
    probe = "output_blocks.11.1.transformer_blocks.0.norm1.bias"
    split_v = write(tmp_path / "v-split.safetensors", unet(1024), tensors={probe: spread})
    single_v = write(
        tmp_path / "v.safetensors", single(unet(1024), "cond_stage_model.model.x", VAE), tensors={UNET + probe: spread}
    )
    base = write(tmp_path / "base-split.safetensors", unet(1024), tensors={probe: spread * 0.1})
    assert [(f.family, f.layout) for f in map(inspect_model, (split_v, single_v, base))] == [
        ("sd2-v", "split"),
        ("sd2-v", "single"),
        ("sd2", "split"),
    ]


def test_hosts_choose_what_they_render(tmp_path):
    write(tmp_path / "flux.safetensors", flux())
    write(tmp_path / "sd1.safetensors", single(unet(768), CLIP_L, VAE))
    write(tmp_path / "sd1-split.safetensors", unet(768))
    plain = FolderCheckpointSource(tmp_path).list_checkpoints()  # the CLI: single SD files only
    assert [c.name for c in plain.checkpoints] == ["sd1.safetensors"]
    reasons = {s.name: s.reason for s in plain.skipped}
    assert (
        "Flux.1 dev split diffusion-model file" in reasons["flux.safetensors"]
        and "ComfyUI" in reasons["flux.safetensors"]
    )
    assert "SD 1.x split" in reasons["sd1-split.safetensors"]
    files = [(p.name, p) for p in sorted(tmp_path.glob("*.safetensors"))]
    listing = list_checkpoint_files(files, renders=everything_renders)
    assert {(c.name, c.family, c.layout) for c in listing.checkpoints} == {
        ("flux.safetensors", "flux-dev", "split"),
        ("sd1.safetensors", "sd1", "single"),
        ("sd1-split.safetensors", "sd1", "split"),
    }


def test_each_family_has_its_own_recipe_recorded_in_the_settings():
    base = GenerationSettings(sampler="dpmpp_2m", scheduler="karras", negative_prompt="blurry")
    rows = FamilySettings.defaults(base)
    sd1, sd3, dev, schnell, chroma = (rows.for_family(f) for f in ("sd1", "sd3", "flux-dev", "flux-schnell", "chroma"))
    assert (sd1.sampler, sd1.scheduler, sd1.negative_prompt, sd1.latent_channels) == ("dpmpp_2m", "karras", "blurry", 4)
    assert sd1 == GenerationSettings(
        sampler="dpmpp_2m", scheduler="karras", negative_prompt="blurry"
    )  # old specs current
    assert (sd3.latent_channels, sd3.shift, sd3.scheduler, sd3.negative_prompt) == (16, 3.0, "sgm_uniform", "blurry")
    assert (dev.guidance, dev.cfg, dev.negative_prompt, dev.latent_channels) == (3.5, 1.0, "", 16)
    assert (schnell.guidance, schnell.steps) == (None, 4)
    assert (chroma.cfg, chroma.negative_prompt, chroma.guidance) == (4.0, "blurry", None)
    edited = FamilySettings.defaults(
        base, parse_overrides(["flux-dev.guidance=2.5", "flux-dev.sampler=euler", "steps=9"])
    )
    assert (edited.for_family("flux-dev").guidance, edited.for_family("sd1").steps) == (2.5, 9)
    assert edited.for_family("flux-dev").to_dict()["guidance"] == 2.5  # what the spec stores
    with pytest.raises(InvalidInput, match="guidance"):
        FamilySettings.defaults(base, parse_overrides(["flux-dev.guidance=500"]))
    with pytest.raises(InvalidInput, match="not a per-family setting"):
        FamilySettings.defaults(base, parse_overrides(["sd1.latent_channels=16"]))


def test_split_models_record_their_components_single_files_do_not(tmp_path):
    held = {"clip_l": ["clip_l.safetensors"], "t5xxl": ["t5xxl_fp16.safetensors", "t5xxl_fp8.safetensors"]}
    vaes = {"vae16": ["ae.safetensors", "sd3_vae.safetensors"], "vae4": ["sd15_vae.safetensors"]}
    defaults = components.family_components(held, vaes)
    assert defaults["flux-dev"] == {
        "text_encoders": "clip_l.safetensors+t5xxl_fp16.safetensors",
        "vae": "ae.safetensors",
    }
    assert defaults["sd3"]["vae"] == "sd3_vae.safetensors" and defaults["sd1"]["vae"] == "sd15_vae.safetensors"
    rows = FamilySettings.defaults(components=defaults, overrides=parse_overrides(["flux-dev.vae=other.safetensors"]))
    split = CheckpointInfo("f", tmp_path, "0" * 64, family="flux-dev", layout="split")
    whole = CheckpointInfo("f", tmp_path, "0" * 64, family="flux-dev", layout="single")
    assert rows.for_checkpoint(split).vae == "other.safetensors"
    assert rows.for_checkpoint(split).text_encoders == "clip_l.safetensors+t5xxl_fp16.safetensors"
    assert (rows.for_checkpoint(whole).vae, rows.for_checkpoint(whole).text_encoders) == ("", "")
    kinds = {name: kind for kind, names in held.items() for name in names}
    assert defaults["sd3"]["text_encoders"] == "clip_l.safetensors+t5xxl_fp16.safetensors"  # SD3 takes any of its 3
    with pytest.raises(CheckpointError, match=r"Flux.1 dev split model needs text encoder t5xxl in models/text_enc"):
        components.require_components("flux-dev", "clip_l.safetensors", "ae.safetensors", kinds)
    with pytest.raises(CheckpointError, match=r"SD3 / SD3.5 split model needs a text encoder \(clip_l / clip_g"):
        components.require_components("sd3", "", "sd3_vae.safetensors", kinds)
    components.require_components("flux-dev", defaults["flux-dev"]["text_encoders"], "ae.safetensors", kinds)


def test_component_kinds_from_the_header(tmp_path):
    files = {
        "l.safetensors": {"text_model.encoder.layers.0.mlp.fc1.weight": (1,)},
        "g.safetensors": {"text_model.encoder.layers.30.mlp.fc1.weight": (1,)},
        "t5.safetensors": {"encoder.block.23.layer.1.DenseReluDense.wi_1.weight": (1,)},
        "ae.safetensors": {"decoder.conv_in.weight": (1, 16, 1, 1)},
        "taesd.safetensors": {"taesd_decoder.1.weight": (1, 4, 1, 1)},
        "lora.safetensors": {"lora_unet.x": (1,)},
    }
    for name, shapes in files.items():
        write(tmp_path / name, shapes)
    found = components.classify([(n, tmp_path / n) for n in files], tmp_path / "cache.json")
    assert found == {
        "clip_l": ["l.safetensors"],
        "clip_g": ["g.safetensors"],
        "t5xxl": ["t5.safetensors"],
        "vae16": ["ae.safetensors"],
        "vae4": ["taesd.safetensors"],
    }


def test_diffusers_runner_names_what_it_cannot_render(tmp_path):
    pytest.importorskip("diffusers")
    from gmi_core.diffusers_generator import DiffusersGenerator

    path = write(tmp_path / "flux.safetensors", single(flux(), *FLUX_SINGLE))
    checkpoint = CheckpointInfo("flux.safetensors", path, "0" * 64, family="flux-dev")
    with pytest.raises(CheckpointError, match=r"Flux.1 dev model: this host renders single-file SD1.x/SD2.x/SDXL"):
        DiffusersGenerator(device="cpu").generate(checkpoint, "a cat", [0], GenerationSettings())
    assert renders_sd_single_files(inspect_model(path), path).reason
    assert all(r.latent_channels in (4, 16) for r in RECIPES.values())


def test_a_split_spec_rendered_with_other_text_encoders_is_other_settings_not_stale(tmp_path):
    from PIL import Image

    from gmi_core.encoders import tiny_encoder
    from gmi_core.engine import Gmi
    from gmi_core.prompts import PromptSet
    from gmi_core.protocols import ListedCheckpoints

    path = write(tmp_path / "flux.safetensors", flux())
    files = [("diffusion_models/flux.safetensors", path)]
    source = ListedCheckpoints(list_checkpoint_files(files, tmp_path / "h.json", renders=everything_renders))
    encoder, prompts = tiny_encoder(seed=0), PromptSet("two", ["a red cube", "a blue sphere"])

    class Renderer:
        def generate(self, checkpoint, prompt, seeds, settings):
            assert settings.text_encoders == "clip_l.safetensors+t5_a.safetensors" and settings.guidance == 3.5
            return [Image.new("RGB", (64, 64), (200, 60, 60)) for _ in seeds]

        def release(self):
            pass

    def engine(t5: str) -> Gmi:
        items = [
            "width=64",
            "height=64",
            f"flux-dev.text_encoders=clip_l.safetensors+{t5}",
            "flux-dev.vae=ae.safetensors",
        ]
        return Gmi(
            tmp_path / "store", encoder, prompts, "allx1", FamilySettings.defaults(overrides=parse_overrides(items))
        )

    assert engine("t5_a.safetensors").build(source, Renderer()).built == ["diffusion_models/flux.safetensors"]
    (status,), _ = engine("t5_b.safetensors").status(source)
    assert (status.state, status.current) == ("ready", False)
    assert "built with other settings (text_encoders" in status.detail and "t5_b.safetensors" in status.detail
    (same,), _ = engine("t5_a.safetensors").status(source)
    assert (same.state, same.current, same.family) == ("ready", True, "flux-dev")
