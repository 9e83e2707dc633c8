"""Write tiny random SD1-layout checkpoints that the real A1111 WebUI loads (CPU, 64x64, a few steps).

Run with the WebUI's own Python (it needs the WebUI's ``ldm`` repository, torch, transformers, ``clip``)::

    python tests/a1111_support/tiny_checkpoints.py --webui /path/to/stable-diffusion-webui \
        --out /tmp/models/Stable-diffusion --count 4

Each checkpoint ``tiny_sd1_<i>.safetensors`` gets a same-named ``.yaml`` (a cut-down v1-inference.yaml) whose text
encoder is a 2-layer 32-wide CLIPTextModel read from a local folder (``tiny_clip_text/``: config + the real CLIP BPE
tokenizer rebuilt from the ``clip`` package's vocabulary file). Weights are seeded per checkpoint; the final
LayerNorm bias and the UNet output conv are randomised (a fresh LayerNorm gives text features with mean exactly 0 and
the WebUI's emphasis renormalisation then divides 0/0), and the VAE decoder's output bias carries a per-checkpoint
colour so that even random CLIP features can tell the checkpoints apart.

Nothing from the WebUI is copied: this file only imports it at run time.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
from pathlib import Path

YAML_TEMPLATE = """\
model:
  base_learning_rate: 1.0e-04
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: 8
    channels: 4
    cond_stage_trainable: false
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_factor: 0.18215
    use_ema: False
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 8
        in_channels: 4
        out_channels: 4
        model_channels: 32
        attention_resolutions: [ 1 ]
        num_res_blocks: 1
        channel_mult: [ 1, 2 ]
        num_heads: 2
        use_spatial_transformer: True
        transformer_depth: 1
        context_dim: 32
        use_checkpoint: False
        legacy: False
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: 64
          in_channels: 3
          out_ch: 3
          ch: 32
          ch_mult: [ 1, 1, 1, 1 ]
          num_res_blocks: 1
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
      params:
        version: "{text_encoder_dir}"
        device: cpu
"""

# Distinct colours (RGB in [-1, 1]) added to the VAE decoder output bias, one per checkpoint.
COLOURS = [
    (0.6, -0.4, -0.4),
    (-0.4, 0.6, -0.4),
    (-0.4, -0.4, 0.6),
    (0.6, 0.6, -0.5),
    (-0.5, 0.6, 0.6),
    (0.6, -0.5, 0.6),
    (0.0, 0.0, 0.0),
    (0.5, 0.1, -0.6),
]


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_tokenizer_files(folder: Path) -> None:
    """Rebuild the OpenAI CLIP BPE tokenizer (vocab.json + merges.txt) from the ``clip`` package's vocabulary."""
    import clip  # clip-anytorch, a WebUI requirement

    bpe_path = Path(clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(bpe_path) as handle:
        merges = handle.read().decode("utf-8").split("\n")
    merges = merges[1 : 49152 - 256 - 2 + 1]
    merge_pairs = [tuple(m.split()) for m in merges]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab.extend("".join(p) for p in merge_pairs)
    vocab.extend(["<|startoftext|>", "<|endoftext|>"])
    (folder / "vocab.json").write_text(
        json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8"
    )
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "model_max_length": 77,
                "do_lower_case": True,
                "tokenizer_class": "CLIPTokenizer",
            }
        ),
        encoding="utf-8",
    )
    (folder / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
            }
        ),
        encoding="utf-8",
    )


def write_text_encoder_folder(folder: Path) -> Path:
    """A local 2-layer, 32-wide CLIPTextModel folder with the real CLIP tokenizer."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "config.json").exists() and (folder / "vocab.json").exists():
        return folder
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=32,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    )
    torch.manual_seed(0)
    CLIPTextModel(config).save_pretrained(str(folder))
    write_tokenizer_files(folder)
    return folder


def _sys_path_for_webui(webui: Path) -> None:
    for p in (webui / "repositories" / "stable-diffusion-stability-ai", webui):
        if str(p) not in sys.path:
            sys.path.insert(0, str(p))


def write_checkpoint(path: Path, index: int, text_encoder_dir: Path, webui: Path) -> Path:
    """One seeded tiny checkpoint + its .yaml. Deterministic for a given ``index``."""
    import torch
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    _sys_path_for_webui(webui)
    from ldm.util import instantiate_from_config

    yaml_text = YAML_TEMPLATE.format(text_encoder_dir=str(text_encoder_dir))
    path.parent.mkdir(parents=True, exist_ok=True)
    yaml_path = path.with_suffix(".yaml")
    yaml_path.write_text(yaml_text, encoding="utf-8")

    torch.manual_seed(1000 + index)
    model = instantiate_from_config(OmegaConf.create(yaml_text).model)
    gen = torch.Generator().manual_seed(2000 + index)
    with torch.no_grad():
        # every weight reseeded per checkpoint so that each file (and its sha256) differs
        for name, p in model.named_parameters():
            if p.dtype.is_floating_point and ("norm" not in name or name.endswith("bias")):
                if p.ndim >= 2:
                    p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / max(1, p[0].numel()) ** 0.5))
                elif name.endswith("bias"):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        tm = model.cond_stage_model.transformer.text_model
        tm.final_layer_norm.bias.copy_(torch.randn(tm.final_layer_norm.bias.shape, generator=gen) * 0.5)
        out_conv = model.model.diffusion_model.out[-1]
        out_conv.weight.copy_(torch.randn(out_conv.weight.shape, generator=gen) * 0.05)
        out_conv.bias.copy_(torch.randn(out_conv.bias.shape, generator=gen) * 0.05)
        dec_out = model.first_stage_model.decoder.conv_out
        dec_out.weight.mul_(0.3)
        dec_out.bias.copy_(torch.tensor(COLOURS[index % len(COLOURS)], dtype=dec_out.bias.dtype))
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(path))
    return path


def write_checkpoints(webui: Path, out_dir: Path, count: int = 4, text_encoder_dir: Path | None = None) -> list[Path]:
    text_encoder_dir = text_encoder_dir or (out_dir.parent / "tiny_clip_text")
    write_text_encoder_folder(text_encoder_dir)
    return [write_checkpoint(out_dir / f"tiny_sd1_{i}.safetensors", i, text_encoder_dir, webui) for i in range(count)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--webui", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path, help="folder for the checkpoints (models/Stable-diffusion)")
    ap.add_argument("--count", type=int, default=4)
    ap.add_argument("--text-encoder-dir", type=Path, default=None)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    for p in write_checkpoints(args.webui.resolve(), args.out.resolve(), args.count, args.text_encoder_dir):
        print(p, p.stat().st_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
