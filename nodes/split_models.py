"""Split models in ComfyUI: a diffusion-model file (models/diffusion_models or models/unet) rendered with text
encoders (models/text_encoders, models/clip) and a VAE (models/vae) through ComfyUI's own UNETLoader, CLIPLoader
and VAELoader code paths; which families this host renders (ComfyUI's own model detection answers for families
gmi does not name).

A split model is listed as ``diffusion_models/<name>``; its spec is keyed by the diffusion model's sha256 and its
settings record the text encoders and VAE it was rendered with.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..gmi_core import components
from ..gmi_core.checkpoints import UNNAMED_MODEL, ModelFile
from ..gmi_core.errors import CheckpointError
from ..gmi_core.families import recipe
from ..gmi_core.protocols import GenerationSettings

log = logging.getLogger("gmi")
SPLIT_PREFIX = "diffusion_models/"  # how split models are named among the checkpoints
SPLIT_SUFFIXES = (".safetensors", ".sft")


def _names(kind: str) -> list[str]:
    import folder_paths

    try:
        return list(folder_paths.get_filename_list(kind))
    except KeyError:
        return []


def _path(kind: str, name: str) -> Path:
    import folder_paths

    path = folder_paths.get_full_path(kind, name) if name else None
    if not path:
        folder = {"text_encoders": "models/text_encoders", "vae": "models/vae"}.get(kind, f"models/{kind}")
        raise CheckpointError(f"no file named {name!r} in {folder}")
    return Path(path)


# -- listing -----------------------------------------------------------------------------------
def split_files() -> list[tuple[str, Path]]:
    """``(diffusion_models/<name>, path)`` of every safetensors file in models/diffusion_models and models/unet."""
    return [
        (SPLIT_PREFIX + name, _path("diffusion_models", name))
        for name in _names("diffusion_models")
        if name.lower().endswith(SPLIT_SUFFIXES)
    ]


def split_path(name: str) -> Path | None:
    """The file behind a split model's name, or None for a checkpoint name."""
    return _path("diffusion_models", name[len(SPLIT_PREFIX) :]) if name.startswith(SPLIT_PREFIX) else None


_COMFY_FAMILY: dict[tuple, str | None] = {}


def comfy_model_class(path: Path) -> str | None:
    """The name of the model class ComfyUI's own detection gives a file (from its header: shapes only), or None.
    Cached per (path, size, mtime)."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _COMFY_FAMILY:
        _COMFY_FAMILY[key] = _detect_with_comfy(path)
    return _COMFY_FAMILY[key]


def _detect_with_comfy(path: Path) -> str | None:
    try:
        import comfy.model_detection
        import comfy.utils
        import torch
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            names = list(handle.keys())
            state = {k: torch.empty(handle.get_slice(k).get_shape(), device="meta") for k in names}
        prefix = comfy.model_detection.unet_prefix_from_state_dict(state)
        bare = comfy.utils.state_dict_prefix_replace(state, {prefix: ""}, filter_keys=True) or state
        config = comfy.model_detection.model_config_from_unet(bare, "")
    except Exception as exc:  # noqa: BLE001 - detection of an odd file must not break the listing
        log.debug("gmi: ComfyUI detection of %s failed: %s", path.name, exc)
        return None
    return type(config).__name__ if config is not None else None


def comfy_renders(found: ModelFile, path: Path) -> ModelFile:
    """This host's policy: every family gmi names, single and split; a file gmi does not name is rendered as
    ``other`` when ComfyUI's own detection knows its model (single files through the checkpoint loader)."""
    if found.family not in (None, "other"):
        return found
    if found.family is None and UNNAMED_MODEL not in (found.reason or ""):
        return found  # LoRA, VAE, refiner, inpainting, Flux Fill, truncated ...: nothing to render
    known = comfy_model_class(Path(path))
    if known is None:
        return found if found.reason else ModelFile(None, found.layout, "a diffusion model ComfyUI does not know")
    return ModelFile("other", found.layout)


# -- components --------------------------------------------------------------------------------
def component_files(hash_cache: Path | None = None) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """({kind: text-encoder names}, {vae<channels>: VAE names}) in ComfyUI's folders, by header."""
    encoders = components.classify(((n, _path("text_encoders", n)) for n in _names("text_encoders")), hash_cache)
    vaes = components.classify(((n, _path("vae", n)) for n in _names("vae")), hash_cache)
    return (
        {k: v for k, v in encoders.items() if not k.startswith("vae")},
        {k: v for k, v in vaes.items() if k.startswith("vae")},
    )


def family_components(hash_cache: Path | None = None) -> dict[str, dict]:
    """Per family, the text encoders and VAE a split model renders with by default: what the folders hold."""
    return components.family_components(*component_files(hash_cache))


def component_kinds(hash_cache: Path | None = None) -> dict[str, str]:
    encoders, _ = component_files(hash_cache)
    return {name: kind for kind, names in encoders.items() for name in names}


# -- loading (ComfyUI's loader node code paths) --------------------------------------------------
def load_diffusion_model(path: Path):
    """UNETLoader with weight_dtype "default"."""
    import comfy.sd

    return comfy.sd.load_diffusion_model(str(path), model_options={})


def load_text_encoders(family: str, names: list[str]):
    """CLIPLoader / DualCLIPLoader / TripleCLIPLoader with the family's type."""
    import comfy.sd
    import folder_paths

    clip_type = getattr(comfy.sd.CLIPType, recipe(family).clip_type.upper(), comfy.sd.CLIPType.STABLE_DIFFUSION)
    paths = [str(_path("text_encoders", name)) for name in names]
    return comfy.sd.load_clip(
        ckpt_paths=paths, embedding_directory=folder_paths.get_folder_paths("embeddings"), clip_type=clip_type
    )


def load_vae(name: str):
    """VAELoader for a file in models/vae."""
    import comfy.sd
    import comfy.utils

    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(_path("vae", name))))
    vae.throw_exception_if_invalid()
    return vae


class SplitParts:
    """Text encoders and VAEs of one build, each loaded once however many split models share them."""

    def __init__(self, hash_cache: Path | None = None):
        self.hash_cache = hash_cache
        self._loaded: dict[tuple, object] = {}
        self._kinds: dict[str, str] | None = None

    def encoders_and_vae(self, family: str, settings: GenerationSettings):
        if self._kinds is None:
            self._kinds = component_kinds(self.hash_cache)
        components.require_components(family, settings.text_encoders, settings.vae, self._kinds)
        names = [n for n in settings.text_encoders.split(components.SEPARATOR) if n]
        clip_key = ("clip", recipe(family).clip_type, tuple(names))
        if clip_key not in self._loaded:
            self._loaded[clip_key] = load_text_encoders(family, names)
        vae_key = ("vae", settings.vae)
        if vae_key not in self._loaded:
            self._loaded[vae_key] = load_vae(settings.vae)
        return self._loaded[clip_key], self._loaded[vae_key]

    def clear(self) -> None:
        self._loaded.clear()


def load_split(path: Path, family: str, settings: GenerationSettings, parts: SplitParts | None = None):
    """(MODEL, CLIP, VAE) of a split model with the text encoders and VAE of ``settings``."""
    clip, vae = (parts or SplitParts()).encoders_and_vae(family, settings)
    return load_diffusion_model(path), clip, vae


def recorded_settings(engine, sha256: str) -> GenerationSettings | None:
    """The settings a spec of ``sha256`` was rendered with (this engine's encoder and prompt set)."""
    for entry in engine.store.entries():
        if (entry.sha256, entry.encoder_id, entry.prompt_set_hash) == (
            sha256,
            engine.encoder.encoder_id,
            engine.prompt_set.hash,
        ):
            return GenerationSettings.from_dict(entry.settings)
    return None
