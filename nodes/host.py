"""ComfyUI's side of the gmi seams: checkpoint source and generator (the Identify node loads the winner).

ComfyUI's modules are imported inside the functions that need them: importing ``comfy.model_management``
picks the torch device, and the node unit tests put fakes of it and of ``folder_paths`` in place per test.
Checkpoint names are resolved only through ``folder_paths``.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..gmi_core.checkpoints import inspect_model, list_checkpoint_files
from ..gmi_core.encoder_files import console_download_bar, inspect_weights
from ..gmi_core.encoders import Placement
from ..gmi_core.errors import CheckpointError
from ..gmi_core.paths import offered, resolve_inside
from ..gmi_core.protocols import CheckpointInfo, CheckpointListing, GenerationSettings
from . import recipes, split_models
from .loras import apply_lora

log = logging.getLogger("gmi")


# -- folders -----------------------------------------------------------------------------------
def gmi_user_dir() -> Path:
    """Spec store, hash cache and panel settings live under ComfyUI's user directory."""
    import folder_paths

    return Path(folder_paths.get_user_directory()) / "gmi"


def register_model_folder() -> None:
    """A ``models/gmi`` folder for CLIP weights (gmi downloads the default encoder there), next to ``clip_vision``."""
    import folder_paths

    if "gmi" not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths["gmi"] = ([str(Path(folder_paths.models_dir) / "gmi")], {".safetensors"})


def _folders(kind: str) -> list[Path]:
    import folder_paths

    try:
        return [Path(p) for p in folder_paths.get_folder_paths(kind)]
    except KeyError:
        return []


def encoder_own_dirs() -> list[Path]:
    """gmi's model folders: every .safetensors there is checked (by header) as a candidate."""
    register_model_folder()
    return _folders("gmi")


def encoder_search_dirs() -> list[Path]:
    """Other model folders where users keep CLIP weights: only the known file names are checked there."""
    return _folders("clip_vision") + _folders("text_encoders") + _folders("clip")


def encoder_download_dir() -> Path:
    return encoder_own_dirs()[0]


def encoder_files() -> list[str]:
    """gmi encoder files in models/gmi (by relative name); other CLIP weights there serve the known names."""
    import folder_paths

    register_model_folder()
    try:
        names = folder_paths.get_filename_list("gmi")
    except KeyError:
        return []
    return sorted(name for name in names if offered(encoder_file, name) and _is_gmi_file(encoder_file(name)))


def encoder_file(name: str) -> Path:
    """The gmi encoder file a loader name picks: inside models/gmi after resolving symlinks (else refused)."""
    return resolve_inside(name, encoder_own_dirs(), "encoder file")


_GMI_FILE_CACHE: dict[tuple, bool] = {}


def _is_gmi_file(path) -> bool:
    """From the header, cached per (path, size, mtime): the loader lists files on every /object_info."""
    try:
        stat = Path(path).stat()
    except (OSError, TypeError):
        return False
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _GMI_FILE_CACHE:
        found, _ = inspect_weights(Path(path))
        _GMI_FILE_CACHE[key] = found is not None and found.layout == "gmi"
    return _GMI_FILE_CACHE[key]


class ComfyPlacement(Placement):
    """The encoder as a ComfyUI model: loaded to the text-encoder device when used, unloadable by ComfyUI.

    Wrapped in a ``ModelPatcher``, so ``load_models_gpu`` frees room for it (and unloads it for a sampler)
    exactly as it does for CLIP vision models; fp16 where ComfyUI would use it.
    """

    def __init__(self):
        import comfy.model_management as mm

        device = mm.text_encoder_device()
        super().__init__(
            device, torch.float16 if mm.should_use_fp16(device, prioritize_performance=False) else torch.float32
        )
        self.offload_device = mm.text_encoder_offload_device()
        self.patcher = None

    def acquire(self, model: torch.nn.Module) -> torch.device:
        import comfy.model_management as mm
        import comfy.model_patcher

        if self.patcher is None or self.patcher.model is not model:
            self.patcher = comfy.model_patcher.ModelPatcher(
                model, load_device=self.device, offload_device=self.offload_device
            )
        mm.load_models_gpu([self.patcher])
        return self.device


def download_progress():
    """ComfyUI's progress bar on the node and a byte bar on the console for a CLIP weights download."""
    import comfy.utils

    state = {"bar": None}
    console = console_download_bar()

    def update(done: int, total: int) -> None:
        if state["bar"] is None:
            state["bar"] = comfy.utils.ProgressBar(total)
            log.info("gmi: downloading CLIP weights (%.0f MB) into %s", total / 2**20, encoder_download_dir())
        state["bar"].update_absolute(done, total)
        console(done, total)

    return update


def checkpoint_names() -> list[str]:
    import folder_paths

    return list(folder_paths.get_filename_list("checkpoints"))


def checkpoint_path(name: str) -> Path:
    """The file behind a checkpoint name, only ever through ``folder_paths``."""
    import folder_paths

    split = split_models.split_path(name)
    if split:
        return split
    path = folder_paths.get_full_path("checkpoints", name)
    if not path:
        raise CheckpointError(f"no checkpoint named {name!r} in the checkpoints folders")
    return Path(path)


# -- images ------------------------------------------------------------------------------------
def tensor_to_pils(images: torch.Tensor) -> list[Image.Image]:
    """ComfyUI IMAGE (float [B,H,W,C] in 0..1) to RGB PIL images."""
    if images.ndim == 3:
        images = images.unsqueeze(0)
    arr = (images.detach().float().cpu().clamp(0, 1).numpy() * 255.0).round().astype(np.uint8)
    return [Image.fromarray(a[..., :3] if a.shape[-1] >= 3 else np.repeat(a, 3, axis=-1), "RGB") for a in arr]


# -- the seams ---------------------------------------------------------------------------------
class ComfyCheckpointSource:
    """ComfyUI's ``checkpoints`` folders (names only through ``folder_paths``); hashes cached in the gmi user folder."""

    def __init__(self, hash_cache: Path | None = None):
        self.hash_cache = hash_cache

    def list_checkpoints(self) -> CheckpointListing:
        # ComfyUI loads .ckpt files itself with weights_only=True, so they need not be refused here.
        files = [(name, checkpoint_path(name)) for name in checkpoint_names()] + split_models.split_files()
        return list_checkpoint_files(files, self.hash_cache, allow_pickle=True, renders=split_models.comfy_renders)


def load_checkpoint(path: Path):
    """(MODEL, CLIP, VAE) through ComfyUI's own loader."""
    import comfy.sd
    import folder_paths

    out = comfy.sd.load_checkpoint_guess_config(
        str(path), output_vae=True, output_clip=True, embedding_directory=folder_paths.get_folder_paths("embeddings")
    )
    model, clip, vae = out[:3]
    if model is None or clip is None or vae is None:
        raise CheckpointError(f"{Path(path).name}: ComfyUI could not load a model, CLIP and VAE from it")
    return model, clip, vae


def load_winner(engine, name: str, sha256: str):
    """(MODEL, CLIP, VAE) of an identified checkpoint: a split model with the text encoders and VAE its spec was
    rendered with (else the family's current choice), through the same loaders the build used."""
    path = checkpoint_path(name)
    if not name.startswith(split_models.SPLIT_PREFIX):
        return load_checkpoint(path)
    family = split_models.comfy_renders(inspect_model(path), path).family
    settings = split_models.recorded_settings(engine, sha256) or engine.settings_for(
        CheckpointInfo(name, path, sha256, family=family, layout="split")
    )
    return split_models.load_split(path, family, settings)


# Samplers that draw fresh noise while sampling: ComfyUI seeds that noise once per batch, so an image in a batch
# would differ from its single-seed render. These run one seed per call; every other sampler runs a batch.
STOCHASTIC_SAMPLER_MARKS = ("ancestral", "sde", "ddpm", "lcm", "seeds_", "sa_solver")


def batches_exactly(sampler: str) -> bool:
    """Whether a batch with per-image noise renders each image as a single-seed run would."""
    return not any(mark in sampler for mark in STOCHASTIC_SAMPLER_MARKS)


def per_seed_noise(latent: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
    """The noise ComfyUI draws for each seed alone (``prepare_noise`` seeds one generator per call), stacked."""
    import comfy.sample

    return torch.cat([comfy.sample.prepare_noise(latent[:1], int(seed)) for seed in seeds])


class ComfyGenerator:
    """Renders spec images the way a KSampler graph would: the checkpoint's CLIP, sampler and VAE.

    All seeds of a prompt go through one sampler call (a batch with each image's own noise), as a KSampler
    with a batch of latents would; stochastic samplers get one call per seed so results never depend on
    the batch.
    """

    def __init__(self, on_image=None, hash_cache: Path | None = None):
        self.on_image = on_image  # called with the number of images finished (progress bar)
        self.parts = split_models.SplitParts(hash_cache)  # a split model's encoders and VAE, shared across the build
        self._loaded: tuple[tuple, tuple] | None = None
        self._negative: tuple[tuple, object] | None = None  # the loaded model's encoding of the negative prompt
        self._lora: tuple[str, tuple] | None = None  # (combination key, patched MODEL and CLIP)

    def _models(self, checkpoint: CheckpointInfo, settings: GenerationSettings):
        key = (
            Path(checkpoint.path),
            settings.text_encoders,
            settings.vae,
            settings.shift,
            settings.width,
            settings.height,
        )
        if self._loaded is None or self._loaded[0] != key:
            self.release()  # never two diffusion models at once
            self._negative = None
            try:
                if checkpoint.layout == "split":
                    models = split_models.load_split(checkpoint.path, checkpoint.family, settings, self.parts)
                else:
                    models = load_checkpoint(checkpoint.path)
                model, clip, vae = models
                model = recipes.patch_model_sampling(
                    model, checkpoint.family, settings.shift, settings.width, settings.height
                )
                self._loaded = (key, (model, clip, vae))
            except CheckpointError:
                raise
            except Exception as exc:
                raise CheckpointError(f"ComfyUI could not load {checkpoint.name}: {type(exc).__name__}: {exc}") from exc
        return self._loaded[1]

    def generate(self, checkpoint: CheckpointInfo, prompt: str, seeds: Sequence[int], settings: GenerationSettings):
        import comfy.model_management as mm
        import comfy.sample

        model, clip, vae = self._models(checkpoint, settings)  # a LoRA's base (same path): loaded once for its LoRAs
        if checkpoint.lora is not None:
            model, clip = self._with_lora(checkpoint, model, clip)
        positive = recipes.with_guidance(_encode(clip, prompt), settings.guidance)
        if self._negative is None or self._negative[0] != (checkpoint.sha256, settings.negative_prompt):
            self._negative = ((checkpoint.sha256, settings.negative_prompt), _encode(clip, settings.negative_prompt))
        negative = self._negative[1]
        groups = [list(seeds)] if batches_exactly(settings.sampler) else [[seed] for seed in seeds]
        images = []
        for group in groups:
            mm.throw_exception_if_processing_interrupted()
            latent = recipes.empty_latent(len(group), settings.latent_channels, settings.width, settings.height)
            latent = comfy.sample.fix_empty_latent_channels(model, latent)
            samples = comfy.sample.sample(
                model,
                per_seed_noise(latent, group),
                settings.steps,
                settings.cfg,
                settings.sampler,
                settings.scheduler,
                positive,
                negative,
                latent,
                denoise=1.0,
                disable_pbar=True,
                seed=int(group[0]),
            )
            decoded = vae.decode(samples)
            if decoded.ndim == 5:  # some VAEs return [B, T, H, W, C]
                decoded = decoded.reshape(-1, *decoded.shape[-3:])
            images += tensor_to_pils(decoded)
            if self.on_image:
                self.on_image(len(group))
        return images

    def _with_lora(self, checkpoint: CheckpointInfo, model, clip):
        """The base's MODEL/CLIP with the LoRA patched in (ComfyUI's LoRA loader), kept for the LoRA's prompts."""
        if self._lora is None or self._lora[0] != checkpoint.sha256:
            self._lora = (checkpoint.sha256, apply_lora(model, clip, checkpoint))
        return self._lora[1]

    def release(self) -> None:
        self._lora = None
        if self._loaded is None:
            return
        self._loaded = None
        import comfy.model_management as mm

        mm.unload_all_models()
        mm.soft_empty_cache()
        gc.collect()


def _encode(clip, text: str):
    tokens = clip.tokenize(text)
    return clip.encode_from_tokens_scheduled(tokens)
