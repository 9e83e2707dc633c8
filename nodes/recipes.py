"""A family's recipe (gmi_core.families) as the graph ComfyUI's own templates build for it.

* SD1/SD2/SDXL: CLIPTextEncode positive and negative, EmptyLatentImage (4 channels), KSampler with CFG.
* SD3/SD3.5: ModelSamplingSD3(shift), EmptySD3LatentImage (16 channels), KSampler with CFG and a negative prompt.
* Flux dev: ModelSamplingFlux(max_shift, base 0.5, width, height), FluxGuidance(guidance) on the positive, CFG 1
  (no negative prompt: ComfyUI skips the unconditional pass at CFG 1), 16 channels. Flux schnell: no guidance.
* Chroma: T5 only, CFG with a negative prompt, 16 channels.

Every step calls the same ComfyUI functions those nodes call, so a spec image equals the image of that workflow.
"""

from __future__ import annotations

import torch

FLUX_BASE_SHIFT = 0.5  # ModelSamplingFlux's base_shift default in ComfyUI's Flux templates


def patch_model_sampling(model, family: str, shift: float | None, width: int, height: int):
    """ModelSamplingSD3 / ModelSamplingFlux as the templates apply them; unchanged when the recipe has no shift."""
    if shift is None or family not in ("sd3", "flux-dev", "flux-schnell", "chroma"):
        return model
    import comfy.model_sampling

    if family.startswith("flux"):
        x1, x2 = 256, 4096
        slope = (shift - FLUX_BASE_SHIFT) / (x2 - x1)
        value = (width * height / (8 * 8 * 2 * 2)) * slope + (FLUX_BASE_SHIFT - slope * x1)
        base, extra = comfy.model_sampling.ModelSamplingFlux, {}
    else:
        value, base, extra = shift, comfy.model_sampling.ModelSamplingDiscreteFlow, {"multiplier": 1000}

    class ModelSamplingAdvanced(base, comfy.model_sampling.CONST):
        pass

    patched = model.clone()
    sampling = ModelSamplingAdvanced(model.model.model_config)
    sampling.set_parameters(shift=value, **extra)
    patched.add_object_patch("model_sampling", sampling)
    return patched


def with_guidance(conditioning, guidance: float | None):
    """FluxGuidance: the distilled guidance value on every conditioning entry."""
    if guidance is None:
        return conditioning
    import node_helpers

    return node_helpers.conditioning_set_values(conditioning, {"guidance": float(guidance)})


def empty_latent(batch: int, channels: int, width: int, height: int) -> torch.Tensor:
    """EmptyLatentImage (4 channels) / EmptySD3LatentImage (16): zeros at 1/8 of the size."""
    return torch.zeros([batch, channels, height // 8, width // 8])
