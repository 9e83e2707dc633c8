"""One gmi engine per (encoder, prompt set, build settings), cached for the life of the ComfyUI process."""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from pathlib import Path

from ..gmi_core.encoders import ClipEncoder, load_encoder
from ..gmi_core.engine import Gmi
from ..gmi_core.errors import InvalidInput, NotFound
from ..gmi_core.paths import check_component, resolve_inside
from ..gmi_core.prompts import BUILTIN_SETS, PromptSet, load_prompt_set
from ..gmi_core.protocols import GenerationSettings
from ..gmi_core.store import SpecStore
from . import host

OPEN_CLIP_MODELS = ["ViT-L-14/openai", "ViT-B-16/openai", "ViT-B-32/openai"]
_LOCK = threading.RLock()
_ENCODERS: OrderedDict[tuple, ClipEncoder] = OrderedDict()
_ENGINES: OrderedDict[tuple, Gmi] = OrderedDict()
_MAX_ENCODERS = 2
_MAX_ENGINES = 8


def encoder_choices() -> list[str]:
    try:
        files = host.encoder_files()
    except ImportError:  # outside ComfyUI
        files = []
    return files + OPEN_CLIP_MODELS


def get_encoder(name: str, allow_download: bool = False) -> ClipEncoder:
    """An encoder by the name shown in the loader: a file in models/gmi, or an open_clip model/pretrained."""
    key = (name, bool(allow_download))
    with _LOCK:
        if key in _ENCODERS:
            _ENCODERS.move_to_end(key)
            return _ENCODERS[key]
        if not isinstance(name, str) or not name:
            raise InvalidInput("name an encoder")
        if name.endswith(".safetensors"):
            if name not in encoder_choices():  # only files ComfyUI lists in models/gmi, by their listed name
                raise NotFound(f"no encoder file {name[:200]!r} in models/gmi")
            path = resolve_inside(name, host.encoder_search_dirs(), "encoder file")
            encoder = load_encoder(str(path), search_dirs=host.encoder_search_dirs())
        else:
            model, _, pretrained = name.partition("/")
            check_component(model, "CLIP model name")
            check_component(pretrained or "openai", "CLIP weights tag")
            encoder = load_encoder(
                model, pretrained or "openai", search_dirs=host.encoder_search_dirs(), allow_download=allow_download
            )
        encoder.gmi_choice = name  # remembered for the side panel's "Build missing specs"
        _ENCODERS[key] = encoder
        while len(_ENCODERS) > _MAX_ENCODERS:
            _ENCODERS.popitem(last=False)
        return encoder


def prompt_set_dir() -> Path:
    return host.gmi_user_dir() / "prompt_sets"


def prompt_set_choices() -> list[str]:
    try:
        folder = prompt_set_dir()
    except ImportError:  # outside ComfyUI
        return list(BUILTIN_SETS[:1])
    files = sorted(p.name for p in folder.glob("*") if p.suffix in (".txt", ".json")) if folder.is_dir() else []
    return list(BUILTIN_SETS[:1]) + files


def get_prompt_set(name: str, max_prompts: int = 0) -> PromptSet:
    """A built-in set, or a file from <user>/gmi/prompt_sets (by bare file name only)."""
    if name in BUILTIN_SETS:
        prompts = load_prompt_set(name)
    else:
        if not isinstance(name, str) or Path(name).name != name or name.startswith("."):
            raise InvalidInput(f"prompt set {str(name)[:200]!r}: give a file name from the gmi/prompt_sets folder")
        path = resolve_inside(name, [prompt_set_dir()], "prompt set")  # symlinks out of the folder are refused
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
    return host.gmi_user_dir() / "hash_cache.json"


def source() -> host.ComfyCheckpointSource:
    return host.ComfyCheckpointSource(hash_cache())


def get_engine(
    encoder: ClipEncoder,
    prompt_set: PromptSet,
    images_per_prompt: int | None = None,
    settings: GenerationSettings | None = None,
    base_seed: int = 0,
) -> Gmi:
    """The engine for these settings. ``images_per_prompt=None`` (identify): what the store was built with."""
    if images_per_prompt is None:
        images_per_prompt = stored_images_per_prompt(encoder.encoder_id, prompt_set.hash)
    settings = settings or GenerationSettings()
    key = (id(encoder), encoder.encoder_id, prompt_set.hash, images_per_prompt, settings, base_seed)
    with _LOCK:
        if key in _ENGINES:
            _ENGINES.move_to_end(key)
            return _ENGINES[key]
        engine = Gmi(spec_root(), encoder, prompt_set, images_per_prompt=images_per_prompt, settings=settings, base_seed=base_seed)
        _ENGINES[key] = engine
        while len(_ENGINES) > _MAX_ENGINES:
            _ENGINES.popitem(last=False)
        return engine


def stored_images_per_prompt(encoder_id: str, prompt_set_hash: str, default: int = 4) -> int:
    """The images-per-prompt most specs of this encoder and prompt set were built with."""
    counts = Counter(
        e.images_per_prompt for e in store().entries() if e.encoder_id == encoder_id and e.prompt_set_hash == prompt_set_hash
    )
    return counts.most_common(1)[0][0] if counts else default
