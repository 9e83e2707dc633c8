"""Memory over a mixed library: a Build Specs run over 50 models (single-file SD1.5 checkpoints and split SD1.x,
SD3, Flux dev/schnell and Chroma diffusion models sharing text encoders and VAEs) with ComfyUI's loaders, sampler
and model management replaced by recording fakes. It asserts through those calls that two diffusion models are
never held at once, that models are released through comfy.model_management between checkpoints, and that each
shared text encoder and VAE is loaded once per build. The real loaders are exercised in test_comfyui_families.py.
"""

from __future__ import annotations

import sys
import types
import weakref
from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.test_comfyui_nodes import env, load_encoder  # noqa: F401 - fixture

SPLIT_SHAPES = {  # family: header of a split diffusion-model file (shapes detection reads; tiny tensors)
    "sd1": {
        "input_blocks.0.0.weight": (1, 4, 1, 1),
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (1, 768),
    },
    "sd3": {"joint_blocks.0.context_block.attn.qkv.weight": (1,), "x_embedder.proj.weight": (1, 16, 1, 1)},
    "flux-dev": {
        "double_blocks.0.img_attn.norm.key_norm.scale": (1,),
        "img_in.weight": (1, 64),
        "guidance_in.in_layer.weight": (1,),
    },
    "flux-schnell": {"double_blocks.0.img_attn.norm.key_norm.scale": (1,), "img_in.weight": (1, 64)},
    "chroma": {
        "double_blocks.0.img_attn.norm.key_norm.scale": (1,),
        "img_in.weight": (1, 64),
        "distilled_guidance_layer.in_proj.weight": (1,),
    },
}
COMPONENTS = {
    "text_encoders/clip_l.safetensors": {"text_model.encoder.layers.0.mlp.fc1.weight": (1,)},
    "text_encoders/t5xxl_fp16.safetensors": {"encoder.block.23.layer.1.DenseReluDense.wi_1.weight": (1,)},
    "vae/sd15_vae.safetensors": {"decoder.conv_in.weight": (1, 4, 1, 1)},
    "vae/ae.safetensors": {"decoder.conv_in.weight": (1, 16, 1, 1)},
}


def _write(path: Path, shapes: dict, index: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: torch.zeros(s) for k, s in shapes.items()}
    state["gmi_index"] = torch.full((1,), float(index))  # every file a distinct sha256
    save_file(state, str(path))


class Recorder:
    """What the fakes saw: load / sample / unload events in order, and weak references to every diffusion model."""

    def __init__(self):
        self.events: list[tuple] = []
        self.models: list[weakref.ref] = []
        self.held_at_load: list[int] = []

    def alive(self) -> int:
        """Diffusion models still referenced; no collection of its own: releasing them (and collecting any
        cycles) is the generator's job, so a model kept alive until a later collection counts."""
        return sum(ref() is not None for ref in self.models)


class DiffusionModel:
    def __init__(self, path, latent_channels):
        self.path, self.latent_channels = path, latent_channels
        self.model_config = None


class Patcher:
    def __init__(self, model: DiffusionModel):
        self.model = model

    def clone(self):
        return Patcher(self.model)

    def add_object_patch(self, name, value):
        pass

    def get_model_object(self, name):
        return types.SimpleNamespace(latent_channels=self.model.latent_channels, latent_dimensions=2)


def fake_comfy(recorder: Recorder, mm) -> dict:
    def load_model(path, channels):
        recorder.held_at_load.append(recorder.alive())  # diffusion models still in memory when a new one loads
        model = DiffusionModel(str(path), channels)
        recorder.models.append(weakref.ref(model))
        recorder.events.append(("load_model", Path(path).name))
        return Patcher(model)

    class Clip:
        def tokenize(self, text):
            return text

        def encode_from_tokens_scheduled(self, tokens):
            return [[torch.zeros(1, 1, 8), {"pooled_output": torch.zeros(1, 8)}]]

    class Vae:
        def decode(self, samples):
            return torch.full((samples.shape[0], samples.shape[2] * 8, samples.shape[3] * 8, 3), 0.5)

        def throw_exception_if_invalid(self):
            pass

    sd = types.ModuleType("comfy.sd")
    sd.CLIPType = types.SimpleNamespace(STABLE_DIFFUSION=1, SD3=3, FLUX=6, CHROMA=20)
    sd.load_diffusion_model = lambda path, model_options=None: load_model(path, 16 if "sd1" not in str(path) else 4)

    def load_clip(ckpt_paths, embedding_directory=None, clip_type=1, model_options=None):
        recorder.events.append(("load_clip", clip_type, tuple(Path(p).name for p in ckpt_paths)))
        return Clip()

    def vae(sd=None):
        recorder.events.append(("load_vae",))
        return Vae()

    def load_checkpoint_guess_config(path, **kwargs):
        return load_model(path, 4), Clip(), Vae(), None

    sd.load_clip, sd.VAE, sd.load_checkpoint_guess_config = load_clip, vae, load_checkpoint_guess_config
    sample = types.ModuleType("comfy.sample")
    sample.prepare_noise = lambda latent, seed: torch.zeros_like(latent)
    sample.fix_empty_latent_channels = lambda model, latent: latent

    def run_sampler(model, noise, steps, cfg, sampler, scheduler, positive, negative, latent, **kwargs):
        mm.load_models_gpu([model])
        recorder.events.append(("sample", Path(model.model.path).name, latent.shape[1]))
        return latent

    sample.sample = run_sampler
    sampling = types.ModuleType("comfy.model_sampling")

    class Sampling:
        def __init__(self, config):
            pass

        def set_parameters(self, **kwargs):
            pass

    sampling.ModelSamplingDiscreteFlow = sampling.ModelSamplingFlux = Sampling
    sampling.CONST = type("CONST", (), {})
    helpers = types.ModuleType("node_helpers")
    helpers.conditioning_set_values = lambda c, values: [[t[0], {**t[1], **values}] for t in c]
    return {"sd": sd, "sample": sample, "model_sampling": sampling, "node_helpers": helpers}


def test_fifty_mixed_models_never_hold_two_diffusion_models_and_share_encoders(env, monkeypatch):  # noqa: F811
    models = env.base / "models"
    families = list(SPLIT_SHAPES)
    for i in range(46):
        family = families[i % len(families)]
        _write(models / "diffusion_models" / f"{family}-{i:02d}.safetensors", SPLIT_SHAPES[family], i)
    for name, shapes in COMPONENTS.items():
        _write(models / name, shapes)
    folder_paths = sys.modules["folder_paths"]
    for kind in ("diffusion_models", "text_encoders", "vae"):
        monkeypatch.setitem(folder_paths.folder_names_and_paths, kind, ([str(models / kind)], {".safetensors"}))

    recorder = Recorder()
    mm = sys.modules["comfy.model_management"]

    def unload_all_models():
        recorder.events.append(("unload_all",))

    monkeypatch.setattr(mm, "unload_all_models", unload_all_models, raising=False)
    monkeypatch.setattr(sys.modules["comfy.utils"], "load_torch_file", lambda path: {}, raising=False)
    monkeypatch.setattr(mm, "load_models_gpu", lambda patchers: recorder.events.append(("gpu", len(patchers))))
    monkeypatch.setattr(mm, "soft_empty_cache", lambda *a, **k: None, raising=False)
    import comfy

    for name, module in fake_comfy(recorder, mm).items():
        full = name if name == "node_helpers" else f"comfy.{name}"
        monkeypatch.setitem(sys.modules, full, module)
        if full.startswith("comfy."):
            monkeypatch.setattr(comfy, name, module, raising=False)
    monkeypatch.setattr(env.nodes.build_node, "ComfyGenerator", env.nodes.host.ComfyGenerator)  # the real generator

    encoder = load_encoder(env)
    out = env.nodes.GMIBuildSpecs.execute(
        encoder, "missing", "platform", "allx1", "steps=2 width=64 height=64", "euler", "normal", 0, max_prompts=1
    )
    report = out.ui["gmi_build"][0]
    assert len(report["built"]) == 50 and not report["failed"], report

    loads = [e for e in recorder.events if e[0] == "load_model"]
    assert len(loads) == 50  # each model loaded once
    assert recorder.held_at_load == [0] * 50  # no other diffusion model in memory when one loads
    assert recorder.alive() == 0  # and none kept after the build
    between = [e[0] for e in recorder.events if e[0] in ("load_model", "unload_all")]
    assert all(a == "load_model" and b == "unload_all" for a, b in zip(between[::2], between[1::2], strict=True))
    clips = [e for e in recorder.events if e[0] == "load_clip"]
    assert sorted(clips) == sorted(set(clips)) and len(clips) == 4  # sd1, sd3, flux (dev+schnell), chroma: once each
    assert sum(e[0] == "load_vae" for e in recorder.events) == 2  # the 4- and the 16-channel VAE
    channels = {e[1].split("-")[0]: e[2] for e in recorder.events if e[0] == "sample"}
    assert channels == {"ck0.safetensors": 4, "ck1.safetensors": 4, "ck2.safetensors": 4, "ck3.safetensors": 4} | {
        "sd1": 4,
        "sd3": 16,
        "flux": 16,
        "chroma": 16,
    }
