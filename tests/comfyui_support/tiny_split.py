"""Tiny random-weight split models for ComfyUI's folders: a diffusion-model file (bare keys), a text encoder and a
VAE as separate files, as users keep Flux / SD3.5 / SD1.5 downloads.

* SD1.x: the tiny UNet of :mod:`tiny_checkpoint` without its ``model.diffusion_model.`` prefix, the CLIP-L text
  encoder as ``text_model.*`` (what CLIPLoader reads), a TAESD-layout VAE as ``taesd_*``.
* SD3-style MMDiT: depth 1 (hidden size 64, one head), the smallest ComfyUI's detection accepts
  (depth = ``x_embedder`` width / 64), 16 latent channels, a 4,096-wide context (CLIP-L padded, as ComfyUI's SD3
  text encoder pads it when only CLIP-L is given) and a 2,048-wide pooled vector; with a 16-channel TAESD VAE.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from .tiny_checkpoint import COLOURS, _conv, _lin, text_encoder_state_dict, unet_state_dict, vae_state_dict


def _save(sd: dict, path: Path, dtype=torch.float16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.to(dtype).contiguous() for k, v in sd.items()}, str(tmp))
    tmp.replace(path)
    return path


def _strip(sd: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def write_clip_l(path: Path) -> Path:
    return _save(_strip(text_encoder_state_dict(), "cond_stage_model.transformer."), path)


def write_vae(path: Path, seed: int, colour, latent_channels: int = 4) -> Path:
    return _save(_strip(vae_state_dict(seed, colour, latent_channels), "first_stage_model."), path)


def write_sd1_unet(path: Path, seed: int) -> Path:
    return _save(_strip(unet_state_dict(seed), "model.diffusion_model."), path)


def mmdit_state_dict(seed: int, hidden: int = 64, context: int = 4096, pooled: int = 2048) -> dict[str, torch.Tensor]:
    """One joint block (its context half pre-only, as in the last block of every MMDiT), random weights."""
    g = torch.Generator().manual_seed(seed)
    h = hidden
    sd = {
        "pos_embed": torch.randn(1, 256, h, generator=g) * 0.1,  # 16x16 patches: images up to 256 px
        "x_embedder.proj.weight": _conv(g, h, 16, 2),
        "x_embedder.proj.bias": torch.zeros(h),
        "t_embedder.mlp.0.weight": _lin(g, h, 256),
        "t_embedder.mlp.0.bias": torch.zeros(h),
        "t_embedder.mlp.2.weight": _lin(g, h, h),
        "t_embedder.mlp.2.bias": torch.zeros(h),
        "y_embedder.mlp.0.weight": _lin(g, h, pooled),
        "y_embedder.mlp.0.bias": torch.zeros(h),
        "y_embedder.mlp.2.weight": _lin(g, h, h),
        "y_embedder.mlp.2.bias": torch.zeros(h),
        # a strong context projection so that the prompt moves the image
        "context_embedder.weight": _lin(g, h, 768, 3.0).repeat(1, context // 768 + 1)[:, :context],
        "context_embedder.bias": torch.zeros(h),
        "final_layer.linear.weight": _lin(g, 2 * 2 * 16, h),
        "final_layer.linear.bias": torch.randn(2 * 2 * 16, generator=g) * 0.3,
        "final_layer.adaLN_modulation.1.weight": _lin(g, 2 * h, h, 0.5),
        "final_layer.adaLN_modulation.1.bias": torch.zeros(2 * h),
    }
    b = "joint_blocks.0."
    sd[b + "context_block.attn.qkv.weight"] = _lin(g, 3 * h, h)
    sd[b + "context_block.attn.qkv.bias"] = torch.zeros(3 * h)
    sd[b + "context_block.adaLN_modulation.1.weight"] = _lin(g, 2 * h, h, 0.5)
    sd[b + "context_block.adaLN_modulation.1.bias"] = torch.zeros(2 * h)
    sd[b + "x_block.attn.qkv.weight"] = _lin(g, 3 * h, h)
    sd[b + "x_block.attn.qkv.bias"] = torch.zeros(3 * h)
    sd[b + "x_block.attn.proj.weight"] = _lin(g, h, h)
    sd[b + "x_block.attn.proj.bias"] = torch.zeros(h)
    sd[b + "x_block.mlp.fc1.weight"] = _lin(g, 4 * h, h)
    sd[b + "x_block.mlp.fc1.bias"] = torch.zeros(4 * h)
    sd[b + "x_block.mlp.fc2.weight"] = _lin(g, h, 4 * h)
    sd[b + "x_block.mlp.fc2.bias"] = torch.zeros(h)
    sd[b + "x_block.adaLN_modulation.1.weight"] = _lin(g, 6 * h, h, 0.5)
    sd[b + "x_block.adaLN_modulation.1.bias"] = torch.zeros(6 * h)
    return sd


def write_mmdit(path: Path, seed: int) -> Path:
    return _save(mmdit_state_dict(seed), path)


SPLIT_WRITER_VERSION = 1  # bump when a layout or init changes (cache key)
LIBRARY = {  # folder under models/ and file name: writer
    ("diffusion_models", "split-sd1.safetensors"): lambda p: write_sd1_unet(p, 1101),
    ("unet", "tiny-sd3.safetensors"): lambda p: write_mmdit(p, 1201),
    ("text_encoders", "clip_l.safetensors"): write_clip_l,
    ("vae", "taesd-sd15.safetensors"): lambda p: write_vae(p, 2101, COLOURS[1]),
    ("vae", "taesd-sd3.safetensors"): lambda p: write_vae(p, 2201, COLOURS[2], latent_channels=16),
}


def split_library(models: Path, cache: Path) -> dict[str, str]:
    """A split SD1.x model and an SD3-style MMDiT with their text encoder and VAEs, written once into ``cache`` and
    linked into a ComfyUI models folder; the names the loaders list them by."""
    for (folder, name), writer in LIBRARY.items():
        cached = Path(cache) / f"split-v{SPLIT_WRITER_VERSION}" / folder / name
        if not cached.is_file():
            writer(cached)
        link = Path(models) / folder / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(cached)
    return {
        "sd1": "split-sd1.safetensors",
        "sd3": "tiny-sd3.safetensors",
        "clip_l": "clip_l.safetensors",
        "vae_sd1": "taesd-sd15.safetensors",
        "vae_sd3": "taesd-sd3.safetensors",
    }
