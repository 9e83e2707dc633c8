"""Write small random SD1 checkpoints that the real Forge (stable-diffusion-webui-forge) loads on CPU.

Run with Forge's own Python, from anywhere (it imports Forge's ``backend`` and ``huggingface_guess`` at run time)::

    python tests/forge_support/tiny_checkpoints.py --forge /path/to/forge --out /tmp/models/Stable-diffusion --count 4

Why these shapes: Forge does not read a ``.yaml`` for the architecture. ``huggingface_guess`` recognises SD1 by the
UNet alone (``model_channels`` 320, ``context_dim`` 768, conv ``proj_in``) and reads depth, levels and attention
from the state dict, so the UNet here is a cut-down one (two levels, one block each: about 30M parameters). The VAE
and the text encoder, however, are built from the fixed diffusers configs Forge ships for
``runwayml/stable-diffusion-v1-5`` (a shape mismatch is an error there), so they have the real SD1 shapes: the
full VAE and a full CLIP-L text encoder with random weights. Stored in fp16, each file is about 0.45 GB.

As for the A1111 test checkpoints: the final LayerNorm bias is randomised (a fresh LayerNorm gives features with
mean exactly 0 and the emphasis renormalisation divides 0/0), and the VAE decoder's output bias carries a
per-checkpoint colour so that even a random CLIP encoder tells the checkpoints apart. Every checkpoint is checked
with Forge's own ``huggingface_guess.guess`` before it is written. Nothing from Forge is copied.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

SD15_REPO = Path("backend") / "huggingface" / "runwayml" / "stable-diffusion-v1-5"
UNET_CONFIG = {  # the smallest UNet huggingface_guess still takes for SD1 (model_list.SD15)
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [1],
    "channel_mult": [1],
    "num_heads": 8,
    "num_head_channels": -1,
    "use_spatial_transformer": True,
    "transformer_depth": [1],
    "transformer_depth_output": [1, 1],
    "transformer_depth_middle": 1,
    "context_dim": 768,
    "use_linear_in_transformer": False,
}
COLOURS = [  # RGB in [-1, 1], added to the VAE decoder's output bias, one per checkpoint
    (0.6, -0.4, -0.4),
    (-0.4, 0.6, -0.4),
    (-0.4, -0.4, 0.6),
    (0.6, 0.6, -0.5),
    (-0.5, 0.6, 0.6),
    (0.6, -0.5, 0.6),
    (0.0, 0.0, 0.0),
    (0.5, 0.1, -0.6),
]


def use_forge(forge: Path) -> None:
    """Forge's own modules on sys.path; its argument parsers see no arguments of this script."""
    for path in (forge / "packages_3rdparty", forge / "repositories" / "huggingface_guess", forge):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    sys.argv = [*sys.argv[:1], "--always-cpu"]


def _randomise(module, gen, skip_norm_weights: bool = True) -> None:
    import torch

    for name, p in module.named_parameters():
        if not p.dtype.is_floating_point or (skip_norm_weights and "norm" in name and not name.endswith("bias")):
            continue
        if p.ndim >= 2:
            p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / max(1, p[0].numel()) ** 0.5))
        elif name.endswith("bias"):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def state_dict(forge: Path, index: int) -> dict:
    """A seeded SD1 checkpoint in the original (LDM) key layout: model.diffusion_model / first_stage_model /
    cond_stage_model.transformer."""
    import torch
    from backend.nn.unet import IntegratedUNet2DConditionModel
    from backend.nn.vae import IntegratedAutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(1000 + index)
    gen = torch.Generator().manual_seed(2000 + index)
    unet = IntegratedUNet2DConditionModel(
        **{k: (list(v) if isinstance(v, list) else v) for k, v in UNET_CONFIG.items()}
    )
    vae = IntegratedAutoencoderKL.from_config(IntegratedAutoencoderKL.load_config(str(forge / SD15_REPO / "vae")))
    text = CLIPTextModel(CLIPTextConfig.from_pretrained(str(forge / SD15_REPO / "text_encoder")))
    with torch.no_grad():
        for module in (unet, vae, text):
            _randomise(module, gen)
        final_norm = text.text_model.final_layer_norm
        final_norm.bias.copy_(torch.randn(final_norm.bias.shape, generator=gen) * 0.5)
        out_conv = unet.out[-1]
        out_conv.weight.copy_(torch.randn(out_conv.weight.shape, generator=gen) * 0.05)
        out_conv.bias.copy_(torch.randn(out_conv.bias.shape, generator=gen) * 0.05)
        dec_out = vae.decoder.conv_out
        dec_out.weight.mul_(0.3)
        dec_out.bias.copy_(torch.tensor(COLOURS[index % len(COLOURS)], dtype=dec_out.bias.dtype))
    out = {}
    for prefix, module in (
        ("model.diffusion_model.", unet),
        ("first_stage_model.", vae),
        ("cond_stage_model.transformer.", text),
    ):
        for key, value in module.state_dict().items():
            if key.endswith("position_ids"):
                continue
            out[prefix + key] = value.detach().to(torch.float16).contiguous().clone()
    return out


def check_forge_accepts(sd: dict) -> None:
    """Forge's own model detection must see SD1 with exactly this UNet."""
    import huggingface_guess
    from huggingface_guess import model_list

    guess = huggingface_guess.guess(sd)
    if type(guess) is not model_list.SD15:
        raise SystemExit(f"huggingface_guess does not see SD1 but {type(guess).__name__}")
    for key in ("model_channels", "context_dim", "channel_mult", "num_res_blocks", "transformer_depth"):
        seen, wanted = guess.unet_config[key], UNET_CONFIG[key]
        if (list(seen) if isinstance(wanted, list) else seen) != wanted:
            raise SystemExit(f"huggingface_guess reads {key}={seen}, not {wanted}")


def write_checkpoints(forge: Path, out_dir: Path, count: int) -> list[Path]:
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = out_dir / f"tiny_sd1_{index}.safetensors"
        sd = state_dict(forge, index)
        check_forge_accepts(sd)
        save_file(sd, str(path))
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--forge", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path, help="folder for the checkpoints (models/Stable-diffusion)")
    ap.add_argument("--count", type=int, default=4)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    use_forge(args.forge.resolve())
    import torch

    torch.set_num_threads(1)
    for path in write_checkpoints(args.forge.resolve(), args.out.resolve(), args.count):
        print(path, path.stat().st_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
