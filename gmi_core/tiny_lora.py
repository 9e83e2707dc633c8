"""Tiny random LoRA files in the kohya layout for the tiny SD1 checkpoints of :mod:`gmi_core.tiny` (no download).

Each file holds ``lora_unet_*`` / ``lora_te_*`` modules with ``lora_down`` / ``lora_up`` / ``alpha``, named after the
diffusers modules as kohya's sd-scripts name them, so every host's LoRA loader reads it as a user's LoRA. A LoRA made
``near`` another is that LoRA plus a small perturbation: the benchmark's hard pairs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from .tiny import tiny_modules

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
STYLE = 20.0  # conv_out colour-cast strength: large enough for the tiny CLIP encoder to see it
STYLE_CHANNELS = 32  # the tiny UNet's last feature width (conv_out's input)


def _style_module(generator, jitter, rank: int, style: float, offset: float) -> dict[str, torch.Tensor]:
    """A LoCon module on the UNet's ``conv_out`` whose down projection sums its (normalised, positive-mean) inputs:
    it shifts every predicted noise by about the same latent offset, so each LoRA casts its own colour on every
    image, prompt and seed alike (the consistent "style" a real LoRA has; random attention changes are chaotic)."""
    down = torch.full((rank, STYLE_CHANNELS, 3, 3), 1.0 / (STYLE_CHANNELS * 9))
    up = torch.randn(4, rank, 1, 1, generator=generator) * style
    if jitter is not None:
        up = up + torch.randn(4, rank, 1, 1, generator=jitter) * style * offset
    return {
        "lora_unet_conv_out.lora_down.weight": down.contiguous(),
        "lora_unet_conv_out.lora_up.weight": up.contiguous(),
        "lora_unet_conv_out.alpha": torch.tensor(float(rank)),
    }


def lora_targets() -> list[tuple[str, int, int]]:
    """(kohya module name, in features, out features) of every module a tiny LoRA changes."""
    unet, _, text = tiny_modules(0)
    targets = []
    for prefix, model, ends in (("lora_unet_", unet, UNET_TARGETS), ("lora_te_", text, TEXT_TARGETS)):
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.endswith(ends) and ("attn" in name):
                targets.append((prefix + name.replace(".", "_"), module.in_features, module.out_features))
    return targets


def tiny_lora_state(
    seed: int, rank: int = 4, scale: float = 0.1, style: float = STYLE, near: int | None = None, offset: float = 0.15
):
    """The tensors of one tiny LoRA; ``near``: the seed of a LoRA this one stays close to (``offset`` apart)."""
    generator = torch.Generator().manual_seed(seed if near is None else near)
    jitter = torch.Generator().manual_seed(10_000 + seed)
    state = _style_module(generator, jitter if near is not None else None, rank, style, offset)
    for name, fan_in, fan_out in lora_targets():
        down = torch.randn(rank, fan_in, generator=generator) * scale
        up = torch.randn(fan_out, rank, generator=generator) * scale
        if near is not None:
            down = down + torch.randn(rank, fan_in, generator=jitter) * scale * offset
            up = up + torch.randn(fan_out, rank, generator=jitter) * scale * offset
        state[f"{name}.lora_down.weight"] = down.contiguous()
        state[f"{name}.lora_up.weight"] = up.contiguous()
        state[f"{name}.alpha"] = torch.tensor(float(rank))
    return state


def write_tiny_lora(
    path: Path, seed: int, near: int | None = None, metadata: dict[str, str] | None = None, **kwargs
) -> Path:
    """A kohya LoRA file for the tiny SD1 checkpoints; ``metadata`` as kohya writes it (``ss_*``, ``modelspec.*``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1", **(metadata or {})}
    save_file(tiny_lora_state(seed, near=near, **kwargs), str(path), metadata=meta)
    return path


def lora_for_checkpoint_state(checkpoint: Path, seed: int, rank: int = 4, scale: float = 0.1, style: float = STYLE):
    """A kohya LoRA for any single-file SD1 checkpoint, its modules named after the checkpoint's own (LDM) keys as
    kohya names them (``lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q``, ``lora_te_text_model_...``):
    the attention projections, and the colour-cast module on the UNet's output conv (``out.2``)."""
    from safetensors import safe_open

    generator = torch.Generator().manual_seed(seed)
    state = {}
    with safe_open(str(checkpoint), framework="pt") as handle:
        shapes = {k: handle.get_slice(k).get_shape() for k in handle.keys()}  # noqa: SIM118 - safe_open is no dict
    prefixes = (("model.diffusion_model.", "lora_unet_"), ("cond_stage_model.transformer.", "lora_te_"))
    for key, shape in shapes.items():
        for source, target in prefixes:
            module = key[len(source) : -len(".weight")]
            attention = module.endswith(UNET_TARGETS + TEXT_TARGETS) and "attn" in module
            if key.startswith(source) and key.endswith(".weight") and len(shape) == 2 and attention:
                name = target + module.replace(".", "_")
                state[f"{name}.lora_down.weight"] = torch.randn(rank, shape[1], generator=generator) * scale
                state[f"{name}.lora_up.weight"] = torch.randn(shape[0], rank, generator=generator) * scale
                state[f"{name}.alpha"] = torch.tensor(float(rank))
    out_channels, in_channels = shapes["model.diffusion_model.out.2.weight"][:2]
    state["lora_unet_out_2.lora_down.weight"] = torch.full((rank, in_channels, 3, 3), 1.0 / (in_channels * 9))
    state["lora_unet_out_2.lora_up.weight"] = torch.randn(out_channels, rank, 1, 1, generator=generator) * style
    state["lora_unet_out_2.alpha"] = torch.tensor(float(rank))
    return {k: v.contiguous() for k, v in state.items()}


def write_lora_for_checkpoint(path: Path, checkpoint: Path, seed: int, **kwargs) -> Path:
    """:func:`lora_for_checkpoint_state` saved as a kohya LoRA file (SD1 metadata)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1"}
    save_file(lora_for_checkpoint_state(checkpoint, seed, **kwargs), str(path), metadata=meta)
    return path
