"""Finding checkpoints in a folder and telling SD checkpoints from everything else, without unpickling."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from safetensors import safe_open

from .hashing import HashCache
from .paths import one_line, without_path
from .protocols import CheckpointInfo, CheckpointListing, SkippedCheckpoint

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
        return None, f"unreadable or truncated safetensors file ({without_path(str(exc).splitlines()[0], path)[:200]})"
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


def inspect_checkpoint_cached(
    path: Path, cache: HashCache, allow_pickle: bool = False
) -> tuple[str | None, str | None]:
    """:func:`inspect_checkpoint`, remembered per file version in the hash cache (a listing re-reads no header)."""
    fact = "checkpoint_pickle_ok" if allow_pickle else "checkpoint"
    family, reason = cache.remember(path, fact, lambda: list(inspect_checkpoint(path, allow_pickle)))
    return family, reason


Sha256Of = Callable[[str, Path, HashCache], "str | None"]


def list_checkpoint_files(
    files: Iterable[tuple[str, Path]],
    hash_cache: Path | None = None,
    allow_pickle: bool = False,
    sha256: Sha256Of | None = None,
    on_hashing: Callable[[Path], None] | None = None,
) -> CheckpointListing:
    """The one listing loop of every host: each ``(name, path)`` the host names is checked by its header and
    hashed (gmi's hash cache, or the host's own ``sha256(name, path, cache)``); what gmi cannot use is skipped
    with the reason. Hosts that load pickles themselves pass ``allow_pickle``."""
    listing = CheckpointListing()
    cache = HashCache(hash_cache)  # read once per listing
    for name, path in files:
        sha = None
        try:
            family, reason = inspect_checkpoint_cached(path, cache, allow_pickle)
            if reason is None:
                sha = sha256(name, path, cache) if sha256 else cache.sha256(path, on_hashing)
                reason = None if sha else "no sha256 (hashing disabled and file unreadable)"
        except OSError as exc:  # vanished or unreadable while listing: skipped with the reason
            reason = f"unreadable ({exc.strerror or one_line(exc)})"
        if reason:
            listing.skipped.append(SkippedCheckpoint(name, path, reason))
        else:
            listing.checkpoints.append(CheckpointInfo(name, path, sha, family=family))
    cache.save()
    return listing


class FolderCheckpointSource:
    """Checkpoints in a folder tree (the standalone CLI's source)."""

    def __init__(
        self,
        folder: Path,
        hash_cache: Path | None = None,
        allow_pickle: bool = False,
        on_hashing: Callable[[Path], None] | None = None,
    ):
        """``on_hashing(path)`` is called before a file is hashed for the first time (it can take a while)."""
        self.folder = Path(folder)
        self.hash_cache = hash_cache
        self.allow_pickle = allow_pickle
        self.on_hashing = on_hashing

    def list_checkpoints(self) -> CheckpointListing:
        if not self.folder.is_dir():
            return CheckpointListing()
        suffixes = (".safetensors",) + (PICKLE_SUFFIXES if self.allow_pickle else (".ckpt",))
        files = sorted(p for p in self.folder.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
        return list_checkpoint_files(
            ((str(p.relative_to(self.folder)), p) for p in files),
            self.hash_cache,
            self.allow_pickle,
            on_hashing=self.on_hashing,
        )
