"""Tiny random-weight SD1-layout checkpoints for the demo, the benchmarks and tests (no download).

Each checkpoint is a real single-file checkpoint in the original LDM key layout, the layout users'
model folders hold, so it goes through the same loading path as a downloaded one. Models are built
with diffusers from small configs and their keys mapped back to the LDM names.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=32,
)
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(32, 32, 32, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=64,
)
TINY_TEXT = dict(
    vocab_size=49408,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=77,
    projection_dim=32,
)
SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    prediction_type="epsilon",
)


def _resnet(prefix_from: str, prefix_to: str, names: dict[str, str]) -> dict[str, str]:
    return {f"{prefix_from}.{a}": f"{prefix_to}.{b}" for a, b in names.items()}


_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_prefix_map(config: dict) -> dict[str, str]:
    """diffusers UNet module prefixes -> LDM prefixes, for the layouts built here (SD1 style)."""
    per = config["layers_per_block"] + 1
    levels = len(config["block_out_channels"])
    m = {
        "conv_in": "input_blocks.0.0",
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
    }
    m |= {"conv_norm_out": "out.0", "conv_out": "out.2"}
    for i, kind in enumerate(config["down_block_types"]):
        for j in range(config["layers_per_block"]):
            m |= _resnet(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{1 + i * per + j}.0", _UNET_RESNET)
            if kind.startswith("CrossAttn"):
                m[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{1 + i * per + j}.1"
        if i < levels - 1:
            m[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(i + 1) * per}.0.op"
    m |= _resnet("mid_block.resnets.0", "middle_block.0", _UNET_RESNET)
    m["mid_block.attentions.0"] = "middle_block.1"
    m |= _resnet("mid_block.resnets.1", "middle_block.2", _UNET_RESNET)
    for i, kind in enumerate(config["up_block_types"]):
        attn = kind.startswith("CrossAttn")
        for j in range(per):
            m |= _resnet(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{i * per + j}.0", _UNET_RESNET)
            if attn:
                m[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{i * per + j}.1"
        if i < levels - 1:
            m[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{i * per + per - 1}.{2 if attn else 1}.conv"
    return m


def vae_prefix_map(config: dict) -> dict[str, str]:
    levels = len(config["block_out_channels"])
    m = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}
    for part in ("encoder", "decoder"):
        m |= _resnet(f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", _VAE_RESNET)
        m |= _resnet(f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", _VAE_RESNET)
        m |= _resnet(f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", _VAE_ATTN)
    for i in range(levels):
        for j in range(config["layers_per_block"]):
            m |= _resnet(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", _VAE_RESNET)
        for j in range(config["layers_per_block"] + 1):
            m |= _resnet(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{levels - 1 - i}.block.{j}", _VAE_RESNET)
        if i < levels - 1:
            m[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"
            m[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"decoder.up.{levels - 1 - i}.upsample.conv"
    return m


def _rename(state: dict[str, torch.Tensor], prefixes: dict[str, str]) -> dict[str, torch.Tensor]:
    """Rename by the longest matching module prefix; keys with no match keep their name."""
    ordered = sorted(prefixes, key=len, reverse=True)
    out = {}
    for key, value in state.items():
        new = key
        for prefix in ordered:
            if key == prefix or key.startswith(prefix + "."):
                new = prefixes[prefix] + key[len(prefix) :]
                break
        out[new] = value
    return out


def ldm_state_dict(unet, vae, text_encoder) -> dict[str, torch.Tensor]:
    """One SD1 single-file state dict (original LDM layout) from diffusers/transformers modules."""
    state = {}
    for k, v in _rename(unet.state_dict(), unet_prefix_map(dict(unet.config))).items():
        state[f"model.diffusion_model.{k}"] = v
    for k, v in _rename(vae.state_dict(), vae_prefix_map(dict(vae.config))).items():
        if ".mid.attn_1." in k and k.endswith("weight") and v.ndim == 2:
            v = v[:, :, None, None]  # LDM VAE attention uses 1x1 convs
        state[f"first_stage_model.{k}"] = v
    for k, v in text_encoder.state_dict().items():
        k = k if k.startswith("text_model.") else f"text_model.{k}"  # transformers >= 5.6 flattened CLIPTextModel
        state[f"cond_stage_model.transformer.{k}"] = v
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


def tiny_modules(seed: int):
    """Random tiny UNet, VAE and text encoder; the VAE output gets a per-seed colour cast."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**TINY_UNET)
        vae = AutoencoderKL(**TINY_VAE)
        text = CLIPTextModel(CLIPTextConfig(**TINY_TEXT))
        with torch.no_grad():
            vae.decoder.conv_out.bias.copy_(torch.rand(3) * 1.2 - 0.6)
            unet.conv_out.weight.normal_(0, 0.05)
    finally:
        torch.random.set_rng_state(state)
    return unet.eval(), vae.eval(), text.eval()


def write_tiny_checkpoint(path: Path, seed: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    unet, vae, text = tiny_modules(seed)
    save_file(ldm_state_dict(unet, vae, text), str(path), metadata={"gmi_tiny_seed": str(seed)})
    return path


def clip_tokenizer_files(folder: Path) -> Path:
    """vocab.json + merges.txt for transformers' CLIPTokenizer, rebuilt from the BPE file open_clip ships."""
    from open_clip.tokenizer import SimpleTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bpe = SimpleTokenizer()
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}  # the names transformers uses
    vocab = {rename.get(token, token): index for token, index in bpe.encoder.items()}
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    merges = sorted(bpe.bpe_ranks.items(), key=lambda item: item[1])
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(pair) for pair, _ in merges) + "\n", encoding="utf-8"
    )
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77, **special}), encoding="utf-8")
    return folder


def tiny_pipeline_config(folder: Path) -> Path:
    """A local diffusers-format config folder matching the tiny checkpoints (for offline from_single_file)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return folder
    unet, vae, text = tiny_modules(0)
    tokenizer = CLIPTokenizer.from_pretrained(
        str(clip_tokenizer_files(folder.with_name(folder.name + ".tok"))), model_max_length=77
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(str(tmp))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.replace(folder)
    shutil.rmtree(folder.with_name(folder.name + ".tok"), ignore_errors=True)
    return folder
