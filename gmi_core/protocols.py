"""The two seams a host implements; gmi_core owns everything else.

A host (ComfyUI, A1111, Forge, the standalone diffusers runner) provides:

* a :class:`CheckpointSource` that lists its checkpoints (through
  :func:`gmi_core.checkpoints.list_checkpoint_files`, from the host's own names and paths),
* a :class:`Generator` that renders images for prompts and seeds with one checkpoint
  through the host's own loader, sampler and VAE.

Which checkpoint to switch to is decided once (:func:`gmi_core.service.pick_installed`); making it active
is host UI (ComfyUI's Identify node outputs its MODEL/CLIP/VAE, A1111 sets ``sd_model_checkpoint``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from PIL import Image

from .families import GenerationSettings  # part of the host contract; its defaults are SD1's row there


@dataclass(frozen=True)
class LoraPart:
    """The LoRA of a checkpoint + LoRA combination (:mod:`gmi_core.loras`): which file, at which strength, on
    which base checkpoint."""

    name: str
    path: Path
    sha256: str
    strength: float
    base: CheckpointInfo


@dataclass(frozen=True)
class CheckpointInfo:
    """One model as a host sees it. ``sha256`` is the spec key; ``name`` is for people.

    A plain checkpoint has ``lora`` None. A LoRA spec's model is its base checkpoint with ``lora`` applied:
    ``sha256`` is then the combination's key (:func:`gmi_core.loras.combination_key`), ``path`` and ``family``
    are the base's, and a Generator renders it with the host's own LoRA loading.
    """

    name: str
    path: Path
    sha256: str
    popularity: float | None = None  # download count or similar, used only by the `download` baseline
    family: str | None = None  # a gmi_core.families name (from the file header); picks the generation settings
    layout: str = "single"  # "single": one file with its text encoders and VAE; "split": a diffusion model only
    lora: LoraPart | None = None  # a LoRA spec: the LoRA on this base at a strength (gmi_core.loras)

    @property
    def short_hash(self) -> str:
        """A1111 / Civitai short hash: the first 10 hex digits of the sha256."""
        return self.sha256[:10]

    @property
    def kind(self) -> str:
        return "lora" if self.lora else "checkpoint"

    @property
    def base_sha256(self) -> str:
        """The checkpoint file a Generator loads: LoRAs on one base share it (no reload between them)."""
        return self.lora.base.sha256 if self.lora else self.sha256


@dataclass
class SkippedCheckpoint:
    """A checkpoint gmi will not use, with the reason shown to the user."""

    name: str
    path: Path
    reason: str


@dataclass
class CheckpointListing:
    checkpoints: list[CheckpointInfo] = field(default_factory=list)
    skipped: list[SkippedCheckpoint] = field(default_factory=list)


@runtime_checkable
class CheckpointSource(Protocol):
    def list_checkpoints(self) -> CheckpointListing:
        """Every usable checkpoint, and the unusable ones with a reason."""


@dataclass
class ListedCheckpoints:
    """A :class:`CheckpointSource` answering with a listing already made: the folders are listed once and the
    answer used by several calls."""

    listing: CheckpointListing

    def list_checkpoints(self) -> CheckpointListing:
        return self.listing


@runtime_checkable
class Generator(Protocol):
    def generate(
        self,
        checkpoint: CheckpointInfo,
        prompt: str,
        seeds: Sequence[int],
        settings: GenerationSettings,
    ) -> list[Image.Image]:
        """One image per seed for ``prompt``, rendered with ``checkpoint``.

        May raise :class:`gmi_core.errors.Cancelled` (or the host's own interrupt exception)
        when the user interrupts; the spec builder has saved everything finished before the call.
        """

    def release(self) -> None:
        """Free the loaded checkpoint; called between checkpoints."""


ProgressCallback = Callable[["BuildProgress"], None]


@dataclass(frozen=True)
class BuildProgress:
    """Reported after each finished prompt of a spec build.

    ``prompts_*`` / ``images_*`` count the current spec's cells within the budget; ``images_planned`` and
    ``images_rendered`` count the whole build (every checkpoint), and ``seconds_per_image`` / ``eta_s`` are
    measured over this build's images so far (None before the first one).
    """

    checkpoint: str
    checkpoint_index: int
    checkpoint_count: int
    prompts_done: int
    prompts_total: int
    images_done: int
    images_total: int
    message: str = ""
    images_planned: int = 0
    images_rendered: int = 0
    seconds_per_image: float | None = None
    eta_s: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def format_eta(seconds: float | None) -> str:
    """``ETA 3m05s`` / ``ETA 2h07m`` for a BuildProgress's ``eta_s``, the same text in every front end."""
    if seconds is None:
        return "ETA after the first images"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"ETA {hours}h{minutes:02d}m" if hours else f"ETA {minutes}m{secs:02d}s"
