"""Finding model files and telling their family and layout from the safetensors header alone, without unpickling."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from .families import FAMILIES, RECIPES, SD_FAMILIES
from .hashing import HashCache
from .paths import one_line, without_path
from .protocols import CheckpointInfo, CheckpointListing, SkippedCheckpoint

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
DETECTION_VERSION = 2  # bump when the rules change: cached answers of older rules are not reused


DIFFUSION_PREFIX = "model.diffusion_model."  # single-file checkpoints; split files carry the bare keys
TEXT_ENCODER_PREFIXES = ("cond_stage_model.", "conditioner.", "text_encoders.")
VAE_PREFIXES = ("first_stage_model.", "vae.")
# Keys that name an architecture, without prefix: (key, family or None when the shape decides)
UNET_KEY = "input_blocks.0.0.weight"
MMDIT_KEY = "joint_blocks.0.context_block.attn.qkv.weight"
FLUX_KEYS = ("double_blocks.0.img_attn.norm.key_norm.scale", "img_in.weight")
CONTEXT_DIM_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl"}  # UNet cross-attention width
UNNAMED_MODEL = "a diffusion model of a family gmi does not know"  # hosts with their own detection look again
V_PROBE = "output_blocks.11.1.transformer_blocks.0.norm1.bias"


@dataclass(frozen=True)
class ModelFile:
    """What a file's header says: a family gmi renders and the layout, or the reason it is skipped."""

    family: str | None
    layout: str = "single"
    reason: str | None = None

    def to_list(self) -> list:
        return [self.family, self.layout, self.reason]


def skipped_model(reason: str) -> ModelFile:
    """A file gmi (or the host's render policy) does not use, with the reason shown to the user."""
    return ModelFile(None, "single", reason)


def detect_family(keys, shape: Callable[[str], tuple] = lambda key: ()) -> ModelFile:
    """The family and layout of a model file from its tensor names and (lazily read) shapes; SD2 base vs 768-v is
    decided afterwards from the header (:func:`sd2_predicts_v`)."""
    keys = list(keys)
    prefixed = any(k.startswith(DIFFUSION_PREFIX) for k in keys)
    prefix = DIFFUSION_PREFIX if prefixed else ""
    bare = {k[len(prefix) :] for k in keys if k.startswith(prefix)}
    has_te = any(k.startswith(TEXT_ENCODER_PREFIXES) for k in keys)
    has_vae = any(k.startswith(VAE_PREFIXES) for k in keys)

    def dim(key: str, axis: int) -> int | None:
        found = shape(prefix + key) if key in bare else ()
        return int(found[axis]) if len(found) > axis else None

    layout = "single" if prefixed and (has_te or has_vae) else "split"
    if MMDIT_KEY in bare:
        channels = dim("x_embedder.proj.weight", 1)
        if channels not in (None, 16):
            return skipped_model(f"MMDiT with {channels} latent channels: not an SD3/SD3.5 model")
        return _complete("sd3", layout, has_te, has_vae)
    if all(k in bare for k in FLUX_KEYS):
        return _flux(bare, dim("img_in.weight", 1), layout, has_te, has_vae)
    if UNET_KEY in bare or (prefixed and _family_from_text_encoder(keys)):  # LDM/SGM text encoders: a UNet model
        return _unet(keys, bare, dim, layout, has_te, has_vae)
    if prefixed:
        return _complete("other", layout, has_te, has_vae)
    return _not_a_model(keys)


def _complete(family: str, layout: str, has_te: bool, has_vae: bool) -> ModelFile:
    """A single file missing its text encoders or VAE is rendered like a split file (the host's folders supply
    them); SD1/SD2/SDXL single files keep the old rule: a checkpoint needs both."""
    if layout == "single" and not (has_te and has_vae) and family not in SD_FAMILIES:
        layout = "split"
    return ModelFile(family, layout)


def _flux(bare: set[str], in_channels: int | None, layout: str, has_te: bool, has_vae: bool) -> ModelFile:
    if any(k.startswith("distilled_guidance_layer.") for k in bare):
        if any(k.startswith("nerf_") for k in bare):
            return _complete("other", layout, has_te, has_vae)  # Chroma Radiance: pixel space, host-detected
        return _complete("chroma", layout, has_te, has_vae)
    if in_channels == 384:
        return skipped_model(
            "Flux Fill (inpainting) model: img_in takes 384 channels, it renders only from an image and mask"
        )
    if in_channels == 128:
        return skipped_model(
            "Flux Depth/Canny (control) model: img_in takes 128 channels, it renders only from a control image"
        )
    if in_channels not in (None, 64):
        return skipped_model(f"Flux-shaped model with {in_channels} input channels (text-to-image Flux takes 64)")
    return _complete("flux-dev" if "guidance_in.in_layer.weight" in bare else "flux-schnell", layout, has_te, has_vae)


def _unet(keys, bare, dim, layout: str, has_te: bool, has_vae: bool) -> ModelFile:
    in_channels = dim(UNET_KEY, 1)
    if in_channels == 9:
        return skipped_model("inpainting model (9 input channels): it renders only from an image and a mask")
    if in_channels not in (None, 4):
        return skipped_model(
            f"UNet with {in_channels} input channels (instruct/edit model): it renders only from an image"
        )
    attn = next((k for k in sorted(bare) if k.endswith("attn2.to_k.weight")), None)
    context = dim(attn, 1) if attn else None
    if context == 1280 or _refiner_encoder(keys):
        return skipped_model("SDXL refiner: it only finishes an SDXL base model's image, it does not render one alone")
    # The cross-attention width names the family; a single file's text encoder names it when the width is another
    # (small test models) or unread.
    family = CONTEXT_DIM_FAMILY.get(context) or _family_from_text_encoder(keys)
    if family is None:
        if layout == "single" and not has_te:
            return skipped_model("checkpoint has no recognised text encoder (cond_stage_model.* / conditioner.*)")
        return skipped_model(f"UNet with {context}-wide cross attention: not an SD1.x, SD2.x or SDXL model")
    if layout == "single" and not has_vae:
        return skipped_model(
            "checkpoint has no VAE (first_stage_model.*); put it in models/unet to render it as a split model"
        )
    return ModelFile(family, layout)


def _refiner_encoder(keys) -> bool:
    embedders = [k for k in keys if k.startswith("conditioner.embedders.")]
    return bool(embedders) and not any(k.startswith("conditioner.embedders.0.transformer.") for k in embedders)


def _family_from_text_encoder(keys) -> str | None:
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    return None


def _not_a_model(keys) -> ModelFile:
    head = keys[:200]
    if any("lora" in k.lower() for k in head):
        hint = "a LoRA"
    elif any(k.startswith(("decoder.conv_in", "encoder.conv_in", "taesd_")) for k in head):
        hint = "a VAE"
    elif any(k.startswith(("text_model.", "encoder.block.", "transformer.resblocks.", "model.layers.")) for k in head):
        hint = "a text encoder"
    else:
        hint = "a VAE, LoRA, embedding or " + UNNAMED_MODEL
    return skipped_model(f"not a diffusion model gmi knows (no UNet/MMDiT/Flux weights; looks like {hint})")


def inspect_model(path: Path, allow_pickle: bool = False) -> ModelFile:
    """A model file's family and layout, or why gmi skips it. Reads only the safetensors header (and SD2's one
    1,280-value probe tensor).

    Pickle-based files (.ckpt) are never opened by gmi; a host that loads them itself passes
    ``allow_pickle=True`` and gets family "unknown".
    """
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if allow_pickle:
            return ModelFile("unknown")
        return skipped_model(
            "pickle-based checkpoint (.ckpt) is not read by gmi for safety; convert it to .safetensors"
        )
    if path.suffix.lower() not in (".safetensors", ".sft"):
        return skipped_model(f"unsupported file type {path.suffix!r}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
            for name in (keys[0], keys[-1]) if keys else ():
                handle.get_slice(name).get_shape()
            found = detect_family(keys, lambda key: tuple(handle.get_slice(key).get_shape()))
            if found.family == "sd2" and sd2_predicts_v(handle, keys):
                found = ModelFile("sd2-v", found.layout)
    except Exception as exc:  # noqa: BLE001 - every parse failure means the same thing to the user
        return skipped_model(
            f"unreadable or truncated safetensors file ({without_path(str(exc).splitlines()[0], path)[:200]})"
        )
    return found


def inspect_checkpoint(path: Path, allow_pickle: bool = False) -> tuple[str | None, str | None]:
    """(family, None) if gmi can use the file, else (None, reason)."""
    found = inspect_model(path, allow_pickle)
    return found.family, found.reason


def sd2_predicts_v(handle, keys) -> bool:
    """SD2 768-v (v-prediction) rather than SD2 base: header metadata, a ``v_pred`` key, else ComfyUI's
    heuristic on one LayerNorm bias (1,280 values read; v models spread it wider than 0.09)."""
    meta = handle.metadata() or {}
    architecture = meta.get("modelspec.architecture", "").lower()
    if architecture or meta.get("modelspec.prediction_type"):
        return architecture.endswith("-v") or meta.get("modelspec.prediction_type", "").lower() in ("v", "v_prediction")
    if "v_pred" in keys:
        return True
    probe = next((k for k in (DIFFUSION_PREFIX + V_PROBE, V_PROBE) if k in keys), None)
    if probe is None:
        return False
    bias = handle.get_tensor(probe).float()
    return bool(bias.std(unbiased=False) > 0.09)


def inspect_model_cached(path: Path, cache: HashCache, allow_pickle: bool = False) -> ModelFile:
    """:func:`inspect_model`, remembered per file version in the hash cache (a listing re-reads no header)."""
    fact = f"model_v{DETECTION_VERSION}" + ("_pickle_ok" if allow_pickle else "")
    return ModelFile(*cache.remember(path, fact, lambda: inspect_model(path, allow_pickle).to_list()))


Sha256Of = Callable[[str, Path, HashCache], "str | None"]
RenderPolicy = Callable[[ModelFile, Path], ModelFile]  # the host's answer: the file as it renders it, or skipped


def renders_sd_single_files(found: ModelFile, path: Path) -> ModelFile:
    """The policy of a plain SD runner (diffusers, A1111): single-file SD1.x/SD2.x/SDXL checkpoints only."""
    if found.reason or (found.family in (*SD_FAMILIES, "unknown") and found.layout == "single"):
        return found
    kind = RECIPES[found.family].label if found.family in FAMILIES else found.family
    what = "split diffusion-model file" if found.layout == "split" else "model"
    return skipped_model(
        f"{kind} {what}: this host renders single-file SD1.x/SD2.x/SDXL checkpoints; build its spec in ComfyUI"
    )


def list_checkpoint_files(
    files: Iterable[tuple[str, Path]],
    hash_cache: Path | None = None,
    allow_pickle: bool = False,
    sha256: Sha256Of | None = None,
    on_hashing: Callable[[Path], None] | None = None,
    renders: RenderPolicy = renders_sd_single_files,
) -> CheckpointListing:
    """The one listing loop of every host: each ``(name, path)`` the host names is checked by its header and
    hashed (gmi's hash cache, or the host's own ``sha256(name, path, cache)``); what gmi cannot use, or the host
    cannot render (``renders``: its policy over family and layout), is skipped with the reason. Hosts that load
    pickles themselves pass ``allow_pickle``."""
    listing = CheckpointListing()
    cache = HashCache(hash_cache)  # read once per listing
    for name, path in files:
        sha = None
        try:
            found = renders(inspect_model_cached(path, cache, allow_pickle), path)
            reason = found.reason
            if reason is None:
                sha = sha256(name, path, cache) if sha256 else cache.sha256(path, on_hashing)
                reason = None if sha else "no sha256 (hashing disabled and file unreadable)"
        except OSError as exc:  # vanished or unreadable while listing: skipped with the reason
            reason = f"unreadable ({exc.strerror or one_line(exc)})"
        if reason:
            listing.skipped.append(SkippedCheckpoint(name, path, reason))
        else:
            listing.checkpoints.append(CheckpointInfo(name, path, sha, family=found.family, layout=found.layout))
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
