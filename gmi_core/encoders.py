"""CLIP image and text encoders (one open_clip model, both towers, L2-normalised outputs).

Weights are resolved in one place, :func:`resolve_weights`: an explicit file, then the host's model
folders, then the Hugging Face cache that open_clip uses. Only safetensors files are read, so no
pickle is ever loaded. A file written by :func:`save_encoder` carries its own open_clip config in
its header, which is how tests and the demo ship tiny random-weight encoders.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .errors import EncoderUnavailable, NotFound
from .paths import check_component, resolve_inside

DEFAULT_MODEL = "ViT-L-14"
DEFAULT_PRETRAINED = "openai"
WEIGHTS_FILENAME = "open_clip_model.safetensors"

TINY_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@dataclass
class ClipEncoder:
    """A loaded open_clip model. ``encoder_id`` names it in every spec it helps build."""

    encoder_id: str
    model: torch.nn.Module
    preprocess: object
    tokenizer: object
    device: torch.device
    batch_size: int = 16

    @property
    def dim(self) -> int:
        return int(self.model.text_projection.shape[1]) if self.model.text_projection is not None else int(
            self.model.token_embedding.weight.shape[1]
        )

    @torch.inference_mode()
    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """[n, d] float32 unit vectors, on the CPU."""
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = torch.stack([self.preprocess(img.convert("RGB")) for img in images[start : start + self.batch_size]])
            feats = self.model.encode_image(batch.to(self.device))
            out.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.dim)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """[n, d] float32 unit vectors, on the CPU."""
        out = []
        for start in range(0, len(texts), self.batch_size * 4):
            tokens = self.tokenizer(list(texts[start : start + self.batch_size * 4]))
            feats = self.model.encode_text(tokens.to(self.device))
            out.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.dim)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def wrap_open_clip(model: torch.nn.Module, encoder_id: str, mean=None, std=None, device=None) -> ClipEncoder:
    """An open_clip model with its preprocessing and CLIP's BPE tokenizer, as a ClipEncoder."""
    import open_clip

    device = device or default_device()
    model = model.to(device).eval()
    size = model.visual.image_size
    preprocess = open_clip.image_transform(size, is_train=False, mean=mean, std=std)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")  # the CLIP BPE shipped inside open_clip: no download
    return ClipEncoder(encoder_id, model, preprocess, tokenizer, device)


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
    model.gmi_config = TINY_CONFIG
    return wrap_open_clip(model, f"gmi-tiny-clip-s{seed}", device=device)


def save_encoder(encoder: ClipEncoder, path: Path) -> Path:
    """Write an encoder as one safetensors file whose header holds its config and id."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.model.state_dict().items()}
    config = getattr(encoder.model, "gmi_config", None)
    if config is None:
        raise ValueError("only encoders built from a gmi config can be saved; pretrained ones are loaded by name")
    save_file(state, str(path), metadata={"gmi_encoder": json.dumps({"config": config, "encoder_id": encoder.encoder_id})})
    return path


def resolve_weights(
    model_name: str, pretrained: str, weights: Path | None = None, search_dirs: Sequence[Path] = (), allow_download: bool = False
) -> Path:
    """The one place CLIP weights are found. Raises EncoderUnavailable with what to download and where."""
    if weights is not None:
        weights = Path(weights)
        if not weights.is_file():
            raise EncoderUnavailable(f"CLIP weights file {weights} does not exist")
        return weights
    check_component(model_name, "CLIP model name")  # a name, never a path out of the search folders
    check_component(pretrained, "CLIP weights tag")
    candidates = [
        f"{model_name}-{pretrained}.safetensors",
        f"{model_name}.safetensors",
        f"{model_name}/{pretrained}/{WEIGHTS_FILENAME}",
        f"{model_name}/{WEIGHTS_FILENAME}",
    ]
    for folder in search_dirs:
        for rel in candidates:
            path = Path(folder) / rel
            if path.is_file():
                return path
    hub = _hub_repo(model_name, pretrained)
    if hub:
        try:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(hub, WEIGHTS_FILENAME, local_files_only=not allow_download))
        except Exception as exc:  # noqa: BLE001 - offline, missing file, no hub package: all mean "not here"
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        url = f"https://huggingface.co/{hub}/resolve/main/{WEIGHTS_FILENAME}"
    else:
        reason, url = "open_clip knows no download for it", "(none known)"
    places = ", ".join(str(Path(d)) for d in search_dirs) or "(no model folders given)"
    raise EncoderUnavailable(
        f"CLIP weights for {model_name} ({pretrained}) are not available ({reason}). "
        f"Download {url} and save it as {candidates[0]} in one of: {places}; "
        "or pass an explicit weights file; or allow downloads."
    )


def _hub_repo(model_name: str, pretrained: str) -> str | None:
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model_name, pretrained) or {}
    hub = cfg.get("hf_hub", "")
    return hub.rstrip("/") or None


def load_encoder(
    name: str = DEFAULT_MODEL,
    pretrained: str = DEFAULT_PRETRAINED,
    weights: Path | None = None,
    search_dirs: Sequence[Path] = (),
    allow_download: bool = False,
    device=None,
) -> ClipEncoder:
    """An encoder by open_clip model name (weights resolved), or by a path to a gmi encoder file."""
    if str(name).endswith(".safetensors") and weights is None:
        weights = Path(name)
        if not weights.is_absolute():  # a relative name resolves only inside the search folders
            try:
                weights = resolve_inside(name, search_dirs, "encoder file")
            except NotFound as exc:
                raise EncoderUnavailable(str(exc)) from None
        return _load_file(weights, model_name=None, pretrained=pretrained, device=device)
    path = resolve_weights(name, pretrained, weights, search_dirs, allow_download)
    return _load_file(path, model_name=name, pretrained=pretrained, device=device)


def _load_file(path: Path, model_name: str | None, pretrained: str, device=None) -> ClipEncoder:
    import open_clip

    path = Path(path)
    if not path.is_file():
        raise EncoderUnavailable(f"CLIP encoder file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = json.loads((handle.metadata() or {}).get("gmi_encoder", "null") or "null")
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise EncoderUnavailable(f"CLIP encoder file {path} is unreadable: {exc}") from exc
    if header:
        model = build_from_config(header["config"])
        model.gmi_config = header["config"]
        encoder_id, mean, std = header["encoder_id"], None, None
    elif model_name:
        cfg = open_clip.get_pretrained_cfg(model_name, pretrained) or {}
        model = open_clip.create_model(model_name, pretrained=None, quick_gelu=cfg.get("quick_gelu", False), device="cpu")
        encoder_id, mean, std = f"{model_name}/{pretrained}", cfg.get("mean"), cfg.get("std")
    else:
        raise EncoderUnavailable(f"{path} carries no gmi encoder config; name its open_clip model (e.g. {DEFAULT_MODEL})")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing:
        raise EncoderUnavailable(f"{path} does not fit {encoder_id}: {len(missing)} weights missing, e.g. {missing[:3]}")
    return wrap_open_clip(model, encoder_id, mean, std, device)
