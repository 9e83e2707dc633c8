"""Finding checkpoints in a folder and telling SD checkpoints from everything else, without unpickling."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from safetensors import safe_open

from .hashing import HashCache
from .protocols import CheckpointInfo, CheckpointListing, SkippedCheckpoint

SUPPORTED_FAMILIES = ("sd1", "sd2", "sd2-v", "sdxl")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def checkpoint_family(keys) -> tuple[str | None, str | None]:
    """(family, None) for an SD1/SD2/SDXL single-file checkpoint, else (None, reason)."""
    keys = list(keys)
    unet = [k for k in keys if k.startswith("model.diffusion_model.")]
    if not unet:
        hint = "a LoRA" if any("lora" in k for k in keys[:200]) else "a VAE, LoRA, embedding or other model"
        return None, f"not a Stable Diffusion checkpoint (no model.diffusion_model.* UNet weights; looks like {hint})"
    if any(k.startswith(("model.diffusion_model.joint_blocks", "model.diffusion_model.double_blocks")) for k in unet):
        return None, "unsupported architecture (SD3/Flux-style transformer); gmi supports SD1.x, SD2.x and SDXL"
    if not any(k.startswith("first_stage_model.") for k in keys):
        return None, "checkpoint has no VAE (first_stage_model.*); gmi needs a full single-file checkpoint"
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return "sdxl", None
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2", None
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1", None
    return None, "checkpoint has no recognised text encoder (cond_stage_model.* / conditioner.*)"


def inspect_checkpoint(path: Path, allow_pickle: bool = False) -> tuple[str | None, str | None]:
    """(family, None) if gmi can use the file, else (None, reason). Reads only the safetensors header.

    Pickle-based files (.ckpt) are never opened by gmi; a host that loads them itself passes
    ``allow_pickle=True`` and gets family "unknown".
    """
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if allow_pickle:
            return "unknown", None
        return None, "pickle-based checkpoint (.ckpt) is not read by gmi for safety; convert it to .safetensors"
    if path.suffix.lower() != ".safetensors":
        return None, f"unsupported file type {path.suffix!r}"
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
            for name in (keys[0], keys[-1]) if keys else ():
                handle.get_slice(name).get_shape()
            family, reason = checkpoint_family(keys)
            if family == "sd2" and sd2_predicts_v(handle, keys):
                family = "sd2-v"
    except Exception as exc:  # noqa: BLE001 - every parse failure means the same thing to the user
        return None, f"unreadable or truncated safetensors file ({str(exc).splitlines()[0][:200]})"
    return family, reason


V_PROBE = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"


def sd2_predicts_v(handle, keys) -> bool:
    """SD2 768-v (v-prediction) rather than SD2 base: header metadata, a ``v_pred`` key, else ComfyUI's
    heuristic on one LayerNorm bias (1,280 values read; v models spread it wider than 0.09)."""
    meta = handle.metadata() or {}
    architecture = meta.get("modelspec.architecture", "").lower()
    if architecture or meta.get("modelspec.prediction_type"):
        return architecture.endswith("-v") or meta.get("modelspec.prediction_type", "").lower() in ("v", "v_prediction")
    if "v_pred" in keys:
        return True
    if V_PROBE not in keys:
        return False
    bias = handle.get_tensor(V_PROBE).float()
    return bool(bias.std(unbiased=False) > 0.09)


def inspect_checkpoint_cached(path: Path, cache: HashCache, allow_pickle: bool = False) -> tuple[str | None, str | None]:
    """:func:`inspect_checkpoint`, remembered per file version in the hash cache (a listing re-reads no header)."""
    fact = "checkpoint_pickle_ok" if allow_pickle else "checkpoint"
    family, reason = cache.remember(path, fact, lambda: list(inspect_checkpoint(path, allow_pickle)))
    return family, reason


class FolderCheckpointSource:
    """Checkpoints in a folder tree (the standalone CLI's source; hosts have their own)."""

    def __init__(self, folder: Path, hash_cache: Path | None = None, allow_pickle: bool = False,
                 on_hashing: Callable[[Path], None] | None = None):
        """``on_hashing(path)`` is called before a file is hashed for the first time (it can take a while)."""
        self.folder = Path(folder)
        self.hash_cache = hash_cache
        self.allow_pickle = allow_pickle
        self.on_hashing = on_hashing

    def list_checkpoints(self) -> CheckpointListing:
        listing = CheckpointListing()
        if not self.folder.is_dir():
            return listing
        suffixes = (".safetensors",) + (PICKLE_SUFFIXES if self.allow_pickle else (".ckpt",))
        cache = HashCache(self.hash_cache)
        for path in sorted(p for p in self.folder.rglob("*") if p.is_file() and p.suffix.lower() in suffixes):
            name = str(path.relative_to(self.folder))
            family, reason = inspect_checkpoint_cached(path, cache, self.allow_pickle)
            if reason:
                listing.skipped.append(SkippedCheckpoint(name, path, reason))
                continue
            try:
                sha = cache.sha256(path, self.on_hashing)
            except OSError as exc:  # vanished or unreadable while listing: skipped with the reason
                listing.skipped.append(SkippedCheckpoint(name, path, f"unreadable ({exc.strerror or exc})"))
                continue
            listing.checkpoints.append(CheckpointInfo(name, path, sha, family=family))
        cache.save()
        return listing
