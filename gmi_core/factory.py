"""Where engines come from: the one place an encoder is loaded from a host's folders and an engine assembled.

The CLI, the hub build, the library commands and both hosts call these with their own folders and progress
callbacks (in the manner of open_clip's ``create_model_and_transforms``); nothing else calls
:func:`gmi_core.encoders.load_encoder` with folders or builds a :class:`gmi_core.engine.Gmi` from names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .budgets import Budget
from .encoder_files import ProgressFn
from .encoders import ClipEncoder, Placement, load_encoder
from .engine import Gmi
from .families import FamilySettings
from .prompts import DEFAULT_PROMPT_SET, PromptSet, load_prompt_set
from .protocols import GenerationSettings


@dataclass(frozen=True)
class EncoderFolders:
    """Where a host keeps CLIP weights: ``own`` are gmi's folders (every file there is checked), ``search`` the
    host's other model folders (only known file names), ``download`` where a permitted download goes."""

    own: Sequence[Path] = ()
    search: Sequence[Path] = ()
    download: Path | None = None

    @classmethod
    def under_home(cls, home: Path, models: Path | None = None) -> EncoderFolders:
        """The CLI's: HOME/clip, and the checkpoints folder."""
        clip_dir = Path(home) / "clip"
        return cls(own=[clip_dir], search=[models] if models else [], download=clip_dir)


def open_encoder(
    name: str,
    folders: EncoderFolders = EncoderFolders(),
    allow_download: bool = False,
    placement: Placement | None = None,
    progress: ProgressFn | None = None,
    weights: Path | None = None,
    pickle_files: Sequence[Path] = (),
) -> ClipEncoder:
    """The encoder ``name`` (a known name or a gmi encoder file) from ``folders``."""
    return load_encoder(
        name,
        search_dirs=list(folders.search),
        own_dirs=list(folders.own),
        allow_download=allow_download,
        download_dir=folders.download,
        placement=placement,
        progress=progress,
        weights=weights,
        pickle_files=pickle_files,
    )


def make_engine(
    spec_root: Path,
    encoder: ClipEncoder | str,
    prompt_set: PromptSet | str = DEFAULT_PROMPT_SET,
    budget: Budget | None = None,
    settings: FamilySettings | GenerationSettings | None = None,
    base_seed: int = 0,
    *,
    folders: EncoderFolders = EncoderFolders(),
    allow_download: bool = False,
    download_progress: ProgressFn | None = None,
    weights: Path | None = None,
) -> Gmi:
    """An engine over the spec store at ``spec_root``. ``encoder``: a loaded one (hosts keep theirs in a pool) or
    a name opened from ``folders``; ``prompt_set``: a set, or a built-in name or a file."""
    if isinstance(encoder, str):
        encoder = open_encoder(encoder, folders, allow_download, progress=download_progress, weights=weights)
    if isinstance(prompt_set, str):
        prompt_set = load_prompt_set(prompt_set)
    return Gmi(Path(spec_root), encoder, prompt_set, budget, settings, base_seed)
