"""The text encoders and VAEs a split diffusion model is rendered with: their kinds from the header, and the
default choice per family from the files a host's folders hold (host-neutral: ComfyUI and Forge list the files).

Kinds follow the host loaders' own detection (ComfyUI ``comfy.sd.detect_te_model``): ``clip_l`` (12 layers),
``clip_h`` (SD2's OpenCLIP ViT-H, 24 layers), ``clip_g`` (32 layers), ``t5xxl``; a VAE by its latent channels.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from safetensors import safe_open

from .errors import CheckpointError
from .families import RECIPES, recipe
from .hashing import HashCache

SEPARATOR = "+"  # between text-encoder names in GenerationSettings.text_encoders
TEXT_PREFIXES = ("", "text_model.", "transformer.", "cond_stage_model.transformer.", "model.")
VAE_CONV_IN = ("decoder.conv_in.weight", "first_stage_model.decoder.conv_in.weight", "vae.decoder.conv_in.weight")
TAESD_IN = ("taesd_decoder.1.weight", "first_stage_model.taesd_decoder.1.weight")


def component_kind(keys, shape) -> str | None:
    """``clip_l`` / ``clip_h`` / ``clip_g`` / ``t5xxl`` / ``vae<channels>``, or None for anything else."""
    keys = set(keys)

    def has(*names: str) -> bool:
        return any(p + n in keys for p in TEXT_PREFIXES for n in names)

    if has("text_model.encoder.layers.30.mlp.fc1.weight", "transformer.resblocks.30.mlp.c_fc.weight"):
        return "clip_g"
    if has("text_model.encoder.layers.22.mlp.fc1.weight", "transformer.resblocks.22.mlp.c_fc.weight"):
        return "clip_h"
    if has("text_model.encoder.layers.0.mlp.fc1.weight", "transformer.resblocks.0.mlp.c_fc.weight"):
        return "clip_l"
    if "encoder.block.23.layer.1.DenseReluDense.wi_1.weight" in keys:
        return "t5xxl"
    for name in VAE_CONV_IN + TAESD_IN:
        if name in keys:
            return f"vae{int(shape(name)[1])}"
    return None


def inspect_component(path: Path) -> str | None:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return component_kind(handle.keys(), lambda key: tuple(handle.get_slice(key).get_shape()))
    except Exception:  # noqa: BLE001 - an unreadable file is simply not a candidate
        return None


def classify(files: Iterable[tuple[str, Path]], hash_cache: Path | None = None) -> dict[str, list[str]]:
    """``{kind: [host names]}`` of the ``(name, path)`` files, headers read once per file version."""
    cache = HashCache(hash_cache)
    out: dict[str, list[str]] = {}
    for name, path in files:
        try:
            kind = cache.remember(Path(path), "component_v1", lambda p=path: inspect_component(Path(p)))
        except OSError:
            continue
        if kind:
            out.setdefault(kind, []).append(name)
    cache.save()
    return {kind: sorted(names) for kind, names in out.items()}


def _prefer(names: list[str], hint: str) -> str:
    """The file whose name mentions the family (``flux``, ``sd3``), else the first by name."""
    hinted = [n for n in names if hint and hint in n.lower().replace(".", "").replace("-", "")]
    return (hinted or names)[0]


def family_components(text_encoders: dict[str, list[str]], vaes: dict[str, list[str]]) -> dict[str, dict]:
    """Per family, the default ``text_encoders`` and ``vae`` (host names) from the classified folders; a family
    whose files are missing gets what was found (the build names what is missing: :func:`missing_components`)."""
    out = {}
    for family, r in RECIPES.items():
        chosen = [
            _prefer(text_encoders[k], r.hint) for k in r.text_encoders + r.optional_encoders if text_encoders.get(k)
        ]
        vae_names = vaes.get(f"vae{r.latent_channels}", [])
        out[family] = {"text_encoders": SEPARATOR.join(chosen), "vae": _prefer(vae_names, r.hint) if vae_names else ""}
    return out


def missing_components(family: str, text_encoders: str, vae: str, kinds: dict[str, str]) -> str | None:
    """What a split model of ``family`` lacks to render, in one sentence, or None. ``kinds``: host name -> kind."""
    r = recipe(family)
    if family == "other":
        return None if text_encoders and vae else "a split model of another family needs text_encoders and vae set"
    chosen = [n for n in text_encoders.split(SEPARATOR) if n]
    have = {kinds.get(n) for n in chosen}
    lacking = [k for k in r.text_encoders if k not in have]
    parts = []
    if lacking:
        parts.append(f"text encoder {' + '.join(lacking)} in models/text_encoders")
    elif not have & set(r.text_encoders + r.optional_encoders):
        parts.append(f"a text encoder ({' / '.join(r.optional_encoders)}) in models/text_encoders")
    if not vae:
        parts.append(f"a {r.latent_channels}-channel VAE in models/vae")
    if not parts:
        return None
    return (
        f"{r.label} split model needs {' and '.join(parts)} (set {family}.text_encoders=A{SEPARATOR}B / "
        f"{family}.vae=NAME in the family settings)"
    )


def require_components(family: str, text_encoders: str, vae: str, kinds: dict[str, str]) -> None:
    problem = missing_components(family, text_encoders, vae, kinds)
    if problem:
        raise CheckpointError(problem)
