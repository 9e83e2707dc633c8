"""Tiny random-weight SD1.5 checkpoints in the single-file original LDM layout that ComfyUI loads.

Smallest layout ComfyUI accepts (see shared/hosts/comfyui.md): UNet with model_channels 320 and
context_dim 768 but one resolution level holding one res-block + one spatial transformer; the full
CLIP-L text encoder (every key present); a TAESD-layout VAE. No ComfyUI import is needed here: the
key names are written out by hand and checked against ComfyUI by the integration test (it loads them).

Each checkpoint differs from the others by its UNet/VAE seed and by a colour bias in the VAE
decoder's last conv, so images of different checkpoints are far apart even in a random CLIP space,
while prompts and seeds still vary the images within one checkpoint.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import save_file

WRITER_VERSION = 3  # bump when the layout or init changes (cache key)

_TEXT_CACHE: dict[int, dict[str, torch.Tensor]] = {}


def _lin(g: torch.Generator, out_f: int, in_f: int, gain: float = 1.0) -> torch.Tensor:
    return torch.randn(out_f, in_f, generator=g) * (gain / math.sqrt(in_f))


def _conv(g: torch.Generator, out_c: int, in_c: int, k: int, gain: float = 1.0) -> torch.Tensor:
    return torch.randn(out_c, in_c, k, k, generator=g) * (gain / math.sqrt(in_c * k * k))


def _norm(sd: dict, prefix: str, n: int) -> None:
    sd[prefix + ".weight"] = torch.ones(n)
    sd[prefix + ".bias"] = torch.zeros(n)


def _resblock(sd: dict, g: torch.Generator, p: str, c_in: int, c_out: int, emb: int = 1280) -> None:
    _norm(sd, p + "in_layers.0", c_in)
    sd[p + "in_layers.2.weight"] = _conv(g, c_out, c_in, 3)
    sd[p + "in_layers.2.bias"] = torch.zeros(c_out)
    sd[p + "emb_layers.1.weight"] = _lin(g, c_out, emb, 0.5)
    sd[p + "emb_layers.1.bias"] = torch.zeros(c_out)
    _norm(sd, p + "out_layers.0", c_out)
    sd[p + "out_layers.3.weight"] = _conv(g, c_out, c_out, 3, 0.5)
    sd[p + "out_layers.3.bias"] = torch.zeros(c_out)
    if c_in != c_out:
        sd[p + "skip_connection.weight"] = _conv(g, c_out, c_in, 1)
        sd[p + "skip_connection.bias"] = torch.zeros(c_out)


def _transformer(sd: dict, g: torch.Generator, p: str, c: int = 320, ctx: int = 768) -> None:
    _norm(sd, p + "norm", c)
    sd[p + "proj_in.weight"] = _conv(g, c, c, 1)
    sd[p + "proj_in.bias"] = torch.zeros(c)
    b = p + "transformer_blocks.0."
    for attn, kv_dim in (("attn1", c), ("attn2", ctx)):
        sd[b + attn + ".to_q.weight"] = _lin(g, c, c)
        # Large key/value gains make the cross attention depend strongly on the prompt.
        sd[b + attn + ".to_k.weight"] = _lin(g, c, kv_dim, 3.0)
        sd[b + attn + ".to_v.weight"] = _lin(g, c, kv_dim, 3.0)
        sd[b + attn + ".to_out.0.weight"] = _lin(g, c, c)
        sd[b + attn + ".to_out.0.bias"] = torch.zeros(c)
    sd[b + "ff.net.0.proj.weight"] = _lin(g, 8 * c, c)  # GEGLU: 2 x 4c
    sd[b + "ff.net.0.proj.bias"] = torch.zeros(8 * c)
    sd[b + "ff.net.2.weight"] = _lin(g, c, 4 * c)
    sd[b + "ff.net.2.bias"] = torch.zeros(c)
    for n in ("norm1", "norm2", "norm3"):
        _norm(sd, b + n, c)
    sd[p + "proj_out.weight"] = _conv(g, c, c, 1)
    sd[p + "proj_out.bias"] = torch.zeros(c)


def unet_state_dict(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    c, emb = 320, 1280
    sd["time_embed.0.weight"] = _lin(g, emb, c)
    sd["time_embed.0.bias"] = torch.zeros(emb)
    sd["time_embed.2.weight"] = _lin(g, emb, emb)
    sd["time_embed.2.bias"] = torch.zeros(emb)
    sd["input_blocks.0.0.weight"] = _conv(g, c, 4, 3)
    sd["input_blocks.0.0.bias"] = torch.zeros(c)
    _resblock(sd, g, "input_blocks.1.0.", c, c)
    _transformer(sd, g, "input_blocks.1.1.")
    _resblock(sd, g, "middle_block.0.", c, c)
    _transformer(sd, g, "middle_block.1.")
    _resblock(sd, g, "middle_block.2.", c, c)
    for i in range(2):  # num_res_blocks + 1 output blocks, each fed a skip connection
        _resblock(sd, g, f"output_blocks.{i}.0.", 2 * c, c)
        _transformer(sd, g, f"output_blocks.{i}.1.")
    _norm(sd, "out.0", c)
    # Zero-initialised in real training; random here so that every checkpoint predicts differently.
    sd["out.2.weight"] = _conv(g, 4, c, 3, 1.0)
    sd["out.2.bias"] = torch.randn(4, generator=g) * 0.3
    return {"model.diffusion_model." + k: v for k, v in sd.items()}


def text_encoder_state_dict(seed: int = 1234) -> dict[str, torch.Tensor]:
    """The full CLIP-L text encoder (ComfyUI's SD1 config), random; shared by all tiny checkpoints."""
    if seed in _TEXT_CACHE:
        return _TEXT_CACHE[seed]
    g = torch.Generator().manual_seed(seed)
    d, ff, layers = 768, 3072, 12
    p = "cond_stage_model.transformer.text_model."
    sd: dict[str, torch.Tensor] = {}
    sd[p + "embeddings.token_embedding.weight"] = (torch.randn(49408, d, generator=g) * 0.5).half()
    sd[p + "embeddings.position_embedding.weight"] = (torch.randn(77, d, generator=g) * 0.01).half()
    for i in range(layers):
        lp = f"{p}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd[lp + f"self_attn.{proj}.weight"] = (_lin(g, d, d, 0.5)).half()
            sd[lp + f"self_attn.{proj}.bias"] = torch.zeros(d).half()
        for n in ("layer_norm1", "layer_norm2"):
            sd[lp + n + ".weight"] = torch.ones(d).half()
            sd[lp + n + ".bias"] = torch.zeros(d).half()
        sd[lp + "mlp.fc1.weight"] = _lin(g, ff, d, 0.5).half()
        sd[lp + "mlp.fc1.bias"] = torch.zeros(ff).half()
        sd[lp + "mlp.fc2.weight"] = _lin(g, d, ff, 0.5).half()
        sd[lp + "mlp.fc2.bias"] = torch.zeros(d).half()
    sd[p + "final_layer_norm.weight"] = torch.ones(d).half()
    sd[p + "final_layer_norm.bias"] = torch.zeros(d).half()
    _TEXT_CACHE[seed] = sd
    return sd


def _taesd_block(sd: dict, g: torch.Generator, p: str, c: int = 64) -> None:
    for j in (0, 2, 4):
        sd[f"{p}conv.{j}.weight"] = _conv(g, c, c, 3, 1.0)
        sd[f"{p}conv.{j}.bias"] = torch.zeros(c)


def vae_state_dict(seed: int, colour: tuple[float, float, float], latent_channels: int = 4) -> dict[str, torch.Tensor]:
    """TAESD layout (``taesd_encoder.*`` / ``taesd_decoder.*``) with a colour bias in the last conv; 16 latent
    channels for SD3/Flux-style models."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    # Encoder: conv, Block, (conv s2, Block x3) x3, conv
    e = "first_stage_model.taesd_encoder."
    sd[e + "0.weight"] = _conv(g, 64, 3, 3)
    sd[e + "0.bias"] = torch.zeros(64)
    _taesd_block(sd, g, e + "1.")
    idx = 2
    for _ in range(3):
        sd[f"{e}{idx}.weight"] = _conv(g, 64, 64, 3)
        idx += 1
        for _ in range(3):
            _taesd_block(sd, g, f"{e}{idx}.")
            idx += 1
    sd[f"{e}{idx}.weight"] = _conv(g, latent_channels, 64, 3)
    sd[f"{e}{idx}.bias"] = torch.zeros(latent_channels)
    # Decoder: Clamp, conv, ReLU, (Block x3, Upsample, conv) x3, Block, conv
    dp = "first_stage_model.taesd_decoder."
    sd[dp + "1.weight"] = _conv(g, 64, latent_channels, 3, 2.0)
    sd[dp + "1.bias"] = torch.zeros(64)
    idx = 3
    for _ in range(3):
        for _ in range(3):
            _taesd_block(sd, g, f"{dp}{idx}.")
            idx += 1
        idx += 1  # Upsample has no weights
        sd[f"{dp}{idx}.weight"] = _conv(g, 64, 64, 3)
        idx += 1
    _taesd_block(sd, g, f"{dp}{idx}.")
    idx += 1
    sd[f"{dp}{idx}.weight"] = _conv(g, 3, 64, 3, 0.1)
    sd[f"{dp}{idx}.bias"] = torch.tensor(colour, dtype=torch.float32)
    sd["first_stage_model.vae_scale"] = torch.tensor(1.0)
    sd["first_stage_model.vae_shift"] = torch.tensor(0.0)
    return sd


# Distinct, saturated colours so that random CLIP features separate the checkpoints.
COLOURS = [
    (0.75, 0.30, 0.30),
    (0.30, 0.70, 0.35),
    (0.30, 0.35, 0.75),
    (0.75, 0.70, 0.25),
    (0.65, 0.30, 0.70),
    (0.25, 0.70, 0.70),
]


def write_tiny_sd15(path: Path, index: int, dtype: torch.dtype = torch.float16) -> Path:
    """Write checkpoint number ``index`` (its seed and colour follow from it) to ``path``."""
    path = Path(path)
    sd: dict[str, torch.Tensor] = {}
    sd.update(unet_state_dict(1000 + index))
    sd.update(vae_state_dict(2000 + index, COLOURS[index % len(COLOURS)]))
    sd = {k: v.to(dtype).contiguous() for k, v in sd.items()}
    sd.update(text_encoder_state_dict())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(sd, str(tmp), metadata={"gmi_test": f"tiny-sd15 v{WRITER_VERSION} #{index}"})
    tmp.replace(path)
    return path


def cached_tiny_checkpoints(cache_dir: Path, count: int) -> list[Path]:
    """``count`` tiny checkpoints, written once into ``cache_dir`` and reused by later runs."""
    out = []
    for i in range(count):
        p = Path(cache_dir) / f"tiny-sd15-v{WRITER_VERSION}-{i}.safetensors"
        if not p.is_file():
            write_tiny_sd15(p, i)
        out.append(p)
    return out
