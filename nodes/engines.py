"""ComfyUI's names for gmi's encoders, prompt sets and folders; engines come from the shared pool (gmi_core.service)."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from ..gmi_core import service
from ..gmi_core.budgets import Budget, parse_budget
from ..gmi_core.encoder_registry import encoder_names, parse_encoder_name
from ..gmi_core.encoders import ClipEncoder
from ..gmi_core.engine import Gmi
from ..gmi_core.errors import InvalidInput, NotFound
from ..gmi_core.factory import EncoderFolders, open_encoder
from ..gmi_core.families import FamilySettings
from ..gmi_core.hashing import HASH_CACHE_FILE
from ..gmi_core.paths import offered, resolve_inside
from ..gmi_core.prompts import BUILTIN_SETS, DEFAULT_PROMPT_SET, PromptSet, load_prompt_set
from ..gmi_core.store import SpecStore
from . import host, settings, split_models

log = logging.getLogger("gmi")
POOL = service.EnginePool()
ENV_ALLOW_DOWNLOAD = "GMI_ALLOW_DOWNLOAD"  # "0" forbids downloads everywhere (offline installs)


def encoder_choices() -> list[str]:
    """The known encoders (the default first), then gmi encoder files in models/gmi."""
    return encoder_names() + host.encoder_files()


def downloads_allowed(requested: bool = True) -> bool:
    return bool(requested) and os.environ.get(ENV_ALLOW_DOWNLOAD, "1").strip().lower() not in ("0", "false", "no")


def get_encoder(name: str, allow_download: bool = True, wait: bool = True) -> ClipEncoder:
    """An encoder by the name shown in the loader: a known encoder, or a gmi encoder file in models/gmi.
    ``wait=False`` (read routes): raise EncoderLoading instead of waiting for a load."""
    if not isinstance(name, str) or not name:
        raise InvalidInput("name an encoder")
    if parse_encoder_name(name) is None and name not in encoder_choices():  # files listed in models/gmi, by name
        raise NotFound(f"no encoder {name[:200]!r}: name a known encoder or a gmi encoder file in models/gmi")

    def load() -> ClipEncoder:
        if parse_encoder_name(name) is None:
            encoder = open_encoder(str(host.encoder_file(name)), placement=host.ComfyPlacement())
        else:
            encoder = open_encoder(
                name,
                EncoderFolders(host.encoder_own_dirs(), host.encoder_search_dirs(), host.encoder_download_dir()),
                downloads_allowed(allow_download),
                placement=host.ComfyPlacement(),
                progress=host.download_progress(),
            )
        encoder.gmi_choice = name  # remembered for the side panel's "Build missing specs"
        return encoder

    return POOL.encoder(name, load, wait=wait)


ENV_WARM = "GMI_WARM_ON_START"  # "1": load the panel's encoder and label embeddings after start


def warm_in_background() -> threading.Thread | None:
    """GMI_WARM_ON_START=1: the side panel's encoder (if on disk) and its label embeddings, off the start-up path."""
    if os.environ.get(ENV_WARM, "").strip() not in ("1", "true", "yes"):
        return None
    return service.warm_in_background(
        lambda: get_engine(
            get_encoder(settings.load()["encoder"], allow_download=False), get_prompt_set(DEFAULT_PROMPT_SET)
        )
    )


def prompt_set_dir() -> Path:
    return host.gmi_user_dir() / "prompt_sets"


def prompt_set_choices() -> list[str]:
    folder = prompt_set_dir()
    names = sorted(p.name for p in folder.glob("*") if p.suffix in (".txt", ".json")) if folder.is_dir() else []
    return list(BUILTIN_SETS[:1]) + [name for name in names if offered(prompt_set_file, name)]


def prompt_set_file(name: str) -> Path:
    """The file a prompt set name picks in <user>/gmi/prompt_sets: a bare file name; symlinks out are refused."""
    if not isinstance(name, str) or Path(name).name != name or name.startswith("."):
        raise InvalidInput(f"prompt set {str(name)[:200]!r}: give a file name from the gmi/prompt_sets folder")
    return resolve_inside(name, [prompt_set_dir()], "prompt set")


def get_prompt_set(name: str, max_prompts: int = 0) -> PromptSet:
    """A built-in set, or a file from <user>/gmi/prompt_sets (by bare file name only)."""
    if name in BUILTIN_SETS:
        prompts = load_prompt_set(name)
    else:
        path = prompt_set_file(name)
        prompts = load_prompt_set(str(path))
        prompts = PromptSet(Path(name).stem, prompts.prompts)
    if max_prompts and max_prompts < len(prompts):
        prompts = prompts.head(int(max_prompts))
    return prompts


def spec_root() -> Path:
    return host.gmi_user_dir()


def store() -> SpecStore:
    return SpecStore(spec_root())


def hash_cache() -> Path:
    return host.gmi_user_dir() / HASH_CACHE_FILE


def source() -> host.ComfyCheckpointSource:
    return host.ComfyCheckpointSource(hash_cache())


def get_engine(
    encoder: ClipEncoder,
    prompt_set: PromptSet,
    budget: Budget | str | None = None,
    family_settings: FamilySettings | None = None,
    base_seed: int = 0,
) -> Gmi:
    """The engine for these settings; ``budget=None`` (identify, status): the panel's last budget."""
    budget = parse_budget(budget if budget is not None else settings.load()["budget"])
    if family_settings is None:  # identify, status: the family defaults with the split-model parts the folders hold
        family_settings = FamilySettings.defaults(components=split_models.family_components(hash_cache()))
    return POOL.engine(encoder, spec_root(), prompt_set, budget, family_settings, base_seed)
