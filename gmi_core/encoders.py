"""CLIP image and text encoders (both towers of one model, L2-normalised outputs).

:func:`load_encoder` takes a name from :mod:`gmi_core.encoder_registry` (weights found by
:mod:`gmi_core.encoder_files`) or a path to a gmi encoder file. Three layouts load into the same
:class:`ClipEncoder`: open_clip safetensors, transformers ``CLIPModel`` safetensors, and gmi's own files
(an open_clip model whose config rides in the header; tests and the demo ship tiny random ones).
Weights are loaded without a second full copy: the model is built on the meta device and the file's
tensors are assigned into it, one tensor converted at a time.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .encoder_files import GMI_HEADER, ProgressFn, WeightsFile, check_candidate, inspect_weights, resolve_weights
from .encoder_registry import (
    DEFAULT_ENCODER,
    OPENAI_MEAN,
    OPENAI_STD,
    Geometry,
    KnownEncoder,
    encoder_names,
    parse_encoder_name,
)
from .errors import EncoderUnavailable, NotFound
from .paths import resolve_inside, shown, without_path

TINY_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
IMAGE_BATCH = 16
TEXT_BATCH = 256  # labels and prompts are short: big batches, and each batch cut to its longest text


class Placement:
    """Where the encoder computes. Hosts subclass it to load and offload with their memory managers."""

    def __init__(self, device=None, dtype: torch.dtype | None = None):
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)

    def acquire(self, model: torch.nn.Module) -> torch.device:
        """Called before each encode; returns the device inputs go to."""
        if next(model.parameters()).device != self.device:
            model.to(self.device)
        return self.device

    def release(self, model: torch.nn.Module) -> None:
        """Called after each encode."""


class OffloadAfterUse(Placement):
    """Back to the CPU after every encode (low-VRAM hosts), so the GPU holds it only while it runs."""

    def release(self, model: torch.nn.Module) -> None:
        if self.device.type != "cpu":
            model.to("cpu")
            torch.cuda.empty_cache()


@dataclass
class ClipEncoder:
    """A loaded CLIP. ``encoder_id`` names it in every spec it helps build."""

    encoder_id: str
    model: torch.nn.Module  # an _OpenClipTowers or _TransformersTowers
    preprocess: object
    tokenizer: object
    placement: Placement = field(default_factory=Placement)
    layout: str = "gmi"
    source: str = ""  # the file it was loaded from

    @property
    def device(self) -> torch.device:
        return self.placement.device

    @property
    def dim(self) -> int:
        return self.model.embed_dim

    def _run(self, encode, batches) -> torch.Tensor:
        device = self.placement.acquire(self.model)
        try:
            out = [torch.nn.functional.normalize(encode(batch.to(device)).float(), dim=-1).cpu() for batch in batches]
        finally:
            self.placement.release(self.model)
        return torch.cat(out) if out else torch.zeros(0, self.dim)

    @torch.inference_mode()
    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """[n, d] float32 unit vectors, on the CPU."""
        dtype = self.placement.dtype
        batches = (
            torch.stack([self.preprocess(img.convert("RGB")) for img in images[i : i + IMAGE_BATCH]]).to(dtype)
            for i in range(0, len(images), IMAGE_BATCH)
        )
        return self._run(self.model.encode_image, batches)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """[n, d] float32 unit vectors, on the CPU."""
        texts = list(texts)
        batches = (self.tokenizer(texts[i : i + TEXT_BATCH]) for i in range(0, len(texts), TEXT_BATCH))
        return self._run(self.model.encode_text, batches)


def _trim(tokens: torch.Tensor) -> torch.Tensor:
    """Cut a token batch after its last end-of-text token (the highest id in CLIP's vocabulary).

    CLIP's text tower is causal and pools at the end-of-text token, so the padding after it changes
    nothing: a 5-token label costs 6 positions instead of 77.
    """
    return tokens[:, : int(tokens.argmax(dim=-1).max()) + 1]


class _OpenClipTowers(torch.nn.Module):
    """An open_clip ``CLIP`` with a text pass that skips the padding (same result, see _trim)."""

    def __init__(self, clip: torch.nn.Module):
        super().__init__()
        self.clip = clip
        projection = clip.text_projection
        self.embed_dim = int(projection.shape[1] if isinstance(projection, torch.Tensor) else projection.out_features)
        self.image_size = clip.visual.image_size

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(pixels)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        clip = self.clip
        if getattr(clip, "text_pool_type", "argmax") != "argmax" or getattr(clip, "attn_mask", None) is None:
            return clip.encode_text(tokens)
        tokens = _trim(tokens)
        length = tokens.shape[1]
        cast = clip.transformer.get_cast_dtype()
        x = clip.token_embedding(tokens).to(cast) + clip.positional_embedding[:length].to(cast)
        batch_first = getattr(clip.transformer, "batch_first", False)  # open_clip 2.20: sequence first
        x = x if batch_first else x.permute(1, 0, 2)
        x = clip.transformer(x, attn_mask=clip.attn_mask[:length, :length])
        x = clip.ln_final(x if batch_first else x.permute(1, 0, 2))
        x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        projection = clip.text_projection
        return projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection


class _TransformersTowers(torch.nn.Module):
    """A transformers ``CLIPModel`` behind the same two calls (stable from transformers 4.30 to 5.x)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.hf = model
        self.embed_dim = int(model.config.projection_dim)
        self.image_size = int(model.config.vision_config.image_size)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.hf.visual_projection(self.hf.vision_model(pixel_values=pixels).pooler_output)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.hf.text_projection(self.hf.text_model(input_ids=_trim(tokens)).pooler_output)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _wrap(
    towers: torch.nn.Module,
    encoder_id: str,
    layout: str,
    source: str,
    placement: Placement | None,
    mean=OPENAI_MEAN,
    std=OPENAI_STD,
) -> ClipEncoder:
    import open_clip

    placement = placement or Placement()
    towers = towers.eval().requires_grad_(False)
    preprocess = open_clip.image_transform(towers.image_size, is_train=False, mean=mean, std=std)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")  # the CLIP BPE shipped inside open_clip: no download
    return ClipEncoder(encoder_id, towers, preprocess, tokenizer, placement, layout, source)


def build_from_config(config: dict, seed: int = 0) -> torch.nn.Module:
    """A random-weight open_clip CLIP from a config dict, deterministic for a seed."""
    import open_clip

    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return open_clip.CLIP(**config)
    finally:
        torch.random.set_rng_state(generator_state)


def tiny_encoder(seed: int = 0, device=None) -> ClipEncoder:
    """A tiny random-weight encoder for tests and the demo (64-dim joint space)."""
    model = build_from_config(TINY_CONFIG, seed)
    return _wrap(_OpenClipTowers(model), f"gmi-tiny-clip-s{seed}", "gmi", "", Placement(device, torch.float32))


def save_encoder(encoder: ClipEncoder, path: Path, config: dict | None = None) -> Path:
    """Write an open_clip encoder as one safetensors file whose header holds its config and id."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not isinstance(encoder.model, _OpenClipTowers):
        raise ValueError("only open_clip encoders can be saved as gmi encoder files")
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.model.clip.state_dict().items()}
    header = {"config": config or TINY_CONFIG, "encoder_id": encoder.encoder_id}
    save_file(state, str(path), metadata={GMI_HEADER: json.dumps(header)})
    return path


# -- loading without a second copy --------------------------------------------------------------
REBUILT_BUFFERS = ("attn_mask", "position_ids")  # derived from the config; files may or may not carry them


def _assign_weights(model: torch.nn.Module, path: Path, dtype: torch.dtype) -> None:
    """Fill a meta-device model from a safetensors file, one tensor at a time, without copying it twice."""
    expected = set(model.state_dict())
    state = {}
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 - safe_open is not iterable
            if key in expected:
                tensor = handle.get_tensor(key)
                state[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    missing = sorted(k for k in expected - set(state) if k.rsplit(".", 1)[-1] not in REBUILT_BUFFERS)
    if missing:
        raise EncoderUnavailable(f"{shown(path)} lacks {len(missing)} weights of its model, e.g. {missing[:3]}")
    model.load_state_dict(state, strict=False, assign=True)
    _materialise_buffers(model, dtype)


def _materialise_buffers(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Rebuild the buffers the file did not carry, which the meta-device model left empty."""
    for module_name, module in model.named_modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer is None or buffer.device.type != "meta":
                continue
            if name == "attn_mask":  # open_clip's causal text mask
                value = torch.full(tuple(buffer.shape), float("-inf")).triu_(1).to(dtype)
            elif name == "position_ids":  # transformers' position index
                value = torch.arange(buffer.shape[-1]).expand(tuple(buffer.shape)).clone()
            else:
                raise EncoderUnavailable(f"cannot rebuild buffer {module_name}.{name} of the encoder model")
            module.register_buffer(name, value, persistent=name not in module._non_persistent_buffers_set)


def _open_clip_model(config: dict, quick_gelu: bool, path: Path, dtype: torch.dtype) -> _OpenClipTowers:
    import open_clip

    config = dict(config)
    quick_gelu = config.pop("quick_gelu", quick_gelu)
    with torch.device("meta"):
        clip = open_clip.CLIP(**config, quick_gelu=quick_gelu)
    _assign_weights(clip, path, dtype)
    return _OpenClipTowers(clip)


def _transformers_config(weights: WeightsFile):
    """The CLIPConfig: config.json beside the file (hub snapshot) or, for a flat file, from its shapes."""
    from transformers import CLIPConfig

    beside = weights.path.parent / "config.json"
    if beside.is_file():
        try:
            return CLIPConfig.from_pretrained(str(beside.parent))
        except (OSError, ValueError):
            pass
    return CLIPConfig(**transformers_config(weights.geometry))


def transformers_config(g: Geometry) -> dict:
    """CLIPConfig arguments for a geometry: OpenAI CLIP's conventions (64-wide heads, 4x MLP, quick GELU)."""
    return {
        "projection_dim": g.embed_dim,
        "text_config": {
            "hidden_size": g.text_width,
            "intermediate_size": 4 * g.text_width,
            "num_hidden_layers": g.text_layers,
            "num_attention_heads": g.text_width // 64,
            "max_position_embeddings": g.context_length,
            "eos_token_id": 49407,
        },
        "vision_config": {
            "hidden_size": g.vision_width,
            "intermediate_size": 4 * g.vision_width,
            "num_hidden_layers": g.vision_layers,
            "num_attention_heads": g.vision_width // 64,
            "image_size": g.image_size,
            "patch_size": g.patch_size,
        },
    }


def _transformers_model(weights: WeightsFile, dtype: torch.dtype) -> _TransformersTowers:
    from transformers import CLIPModel

    config = _transformers_config(weights)
    with torch.device("meta"):
        model = CLIPModel(config)
    _assign_weights(model, weights.path, dtype)
    return _TransformersTowers(model)


def load_weights_file(
    weights: WeightsFile, entry: KnownEncoder | None, placement: Placement | None = None
) -> ClipEncoder:
    """A ClipEncoder from a checked weights file of any supported layout."""
    placement = placement or Placement()
    dtype = placement.dtype
    try:
        if weights.layout == "gmi":
            config = weights.gmi_config["config"]
            towers = _open_clip_model(config, config.get("quick_gelu", False), weights.path, dtype)
            return _wrap(towers, weights.gmi_config["encoder_id"], "gmi", str(weights.path), placement, None, None)
        if entry is None:
            raise EncoderUnavailable(
                f"{shown(weights.path)} carries no gmi encoder config; choose a known encoder ({DEFAULT_ENCODER})"
            )
        if weights.layout == "open_clip":
            import open_clip

            towers = _open_clip_model(open_clip.get_model_config(entry.model), entry.quick_gelu, weights.path, dtype)
        else:
            towers = _transformers_model(weights, dtype)
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise EncoderUnavailable(
            f"CLIP weights {shown(weights.path)} could not be loaded: {type(exc).__name__}: {without_path(exc, weights.path)}"
        ) from exc
    return _wrap(towers, entry.name, weights.layout, str(weights.path), placement, entry.mean, entry.std)


def load_encoder(
    name: str = DEFAULT_ENCODER,
    search_dirs: Sequence[Path] = (),
    allow_download: bool = False,
    download_dir: Path | None = None,
    own_dirs: Sequence[Path] = (),
    placement: Placement | None = None,
    progress: ProgressFn | None = None,
    weights: Path | None = None,
    pickle_files: Sequence[Path] = (),
) -> ClipEncoder:
    """An encoder by known name (see encoder_registry) or by gmi encoder file path.

    ``own_dirs`` are gmi's own folders (every file there is checked), ``search_dirs`` other model folders
    (only the known file names); ``weights`` an explicit file for the named encoder; downloads go to
    ``download_dir`` (None: the Hugging Face cache). ``pickle_files`` are named in the error, never read.
    """
    entry = parse_encoder_name(name)
    if entry is None:
        path = Path(name)
        if not path.is_absolute():  # a relative name resolves only inside the model folders
            try:
                path = resolve_inside(name, [*own_dirs, *search_dirs], "encoder file")
            except NotFound:
                path = None
        if path is None or not path.is_file():
            raise EncoderUnavailable(
                f"unknown CLIP encoder {name!r}: give one of {', '.join(encoder_names())} "
                "or a gmi encoder .safetensors file"
            )
        found, why = inspect_weights(path)
        if found is None or found.layout != "gmi":
            raise EncoderUnavailable(
                f"{shown(path)} is not a gmi encoder file ({why or found.layout + ' layout'}); "
                f"put CLIP weights in a model folder and choose {DEFAULT_ENCODER}"
            )
        return load_weights_file(found, None, placement)
    if weights is not None:
        found, why = (
            check_candidate(Path(weights), entry, entry.geometry())
            if Path(weights).is_file()
            else (None, "does not exist")
        )
        if found is None:
            raise EncoderUnavailable(f"CLIP weights file {weights}: {why}")
        return load_weights_file(found, entry, placement)
    found = resolve_weights(entry, search_dirs, own_dirs, allow_download, download_dir, progress, pickle_files)
    return load_weights_file(found, entry, placement)
