"""Settings > GMI -> engines from the shared pool (gmi_core.service); the CLIP encoder resolved the WebUI way.

Holds no WebUI UI code; used by the tab, the API routes, the build job and the auto-select script.
"""

from __future__ import annotations

import logging
import os
import threading
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from modules import call_queue, paths, sd_models, shared

from gmi_core import service
from gmi_core.budgets import BUDGETS, DEFAULT_BUDGET, Budget, parse_budget
from gmi_core.encoder_files import console_download_bar
from gmi_core.encoder_registry import DEFAULT_ENCODER, encoder_names, parse_encoder_name
from gmi_core.encoders import ClipEncoder, OffloadAfterUse, Placement
from gmi_core.engine import Gmi
from gmi_core.errors import EncoderLoading, EncoderUnavailable, InvalidInput, NotFound
from gmi_core.factory import EncoderFolders, open_encoder
from gmi_core.families import FAMILIES, FAMILY_DEFAULTS, PER_FAMILY_FIELDS, FamilySettings
from gmi_core.hashing import HASH_CACHE_FILE
from gmi_core.limits import DEFAULT_TOP_K
from gmi_core.paths import inside, resolve_inside, shown
from gmi_core.prompts import BUILTIN_SETS, DEFAULT_PROMPT_SET, PromptSet, load_prompt_set
from gmi_core.protocols import GenerationSettings
from gmi_core.ranker import DEFAULT_METHOD
from gmi_core.results import IdentifyResult

from . import forge, loras
from .host import WebuiCheckpointSource, WebuiGenerator, webui_checkpoints

log = logging.getLogger("gmi")

ENV_ENCODER = "GMI_A1111_ENCODER"  # overrides the encoder setting (tests, headless servers)
FIELD_LABELS = {
    "width": "width of spec images",
    "height": "height of spec images",
    "steps": "sampling steps",
    "cfg": "CFG scale",
    "guidance": "distilled CFG (guidance)",
}


def family_option(family: str, name: str) -> str:
    """``gmi_sdxl_steps``: the option holding one family's setting."""
    return f"gmi_{family.replace('-', '')}_{name}"


# option key -> (default, label, help shown under it); registered by gmi_a1111.options through scripts/gmi_settings.py
OPTIONS: dict[str, tuple[object, str, str]] = {
    "gmi_encoder": (
        DEFAULT_ENCODER,
        "CLIP encoder",
        f"{', '.join(encoder_names())}, or a path to a gmi encoder .safetensors",
    ),
    "gmi_allow_download": (
        True,
        "Download the CLIP encoder's weights on first use",
        "into models/gmi/clip; off: never download",
    ),
    "gmi_warm_start": (False, "After start, load the CLIP encoder and label embeddings in the background", ""),
    "gmi_spec_dir": ("", "Spec folder", "empty: models/gmi in the WebUI's models folder"),
    "gmi_prompt_set": (
        DEFAULT_PROMPT_SET,
        "Prompt set",
        f"'{DEFAULT_PROMPT_SET}' or a JSON list / text file of prompts in the spec folder's prompt_sets",
    ),
    "gmi_budget": (
        DEFAULT_BUDGET,
        "Spec budget",
        ", ".join(f"{k} = {v.label()}" for k, v in BUDGETS.items())
        + ", or PROMPTSxIMAGES such as 32x2; a larger budget later adds only the missing images",
    ),
    **{
        family_option(family, name): (
            FAMILY_DEFAULTS[family][name],
            f"{family.upper()} checkpoints: {FIELD_LABELS.get(name, name)}",
            "",
        )
        for family in forge.HOST_FAMILIES
        for name in PER_FAMILY_FIELDS
    },
    "gmi_sampler": ("Euler", "Sampler for spec images", "the WebUI's sampler name"),
    "gmi_scheduler": ("Automatic", "Schedule type for spec images", "the WebUI's schedule type"),
    "gmi_top_k": (DEFAULT_TOP_K, "Checkpoints shown in a ranking", ""),
    "gmi_method": (
        DEFAULT_METHOD,
        "Ranking method",
        "gmi is the recommended one; the others are the paper's baselines",
    ),
    "gmi_include_not_installed": (
        False,
        "Identify also ranks imported specs of checkpoints that are not installed",
        "marked 'not installed'; never switched to",
    ),
    **loras.OPTIONS,
}
RESETTING_OPTIONS = ("gmi_encoder", "gmi_allow_download", "gmi_spec_dir", "gmi_prompt_set")  # onchange: reset()


def opt(key: str):
    """A gmi option's value from shared.opts.data, its default when unset or blank."""
    default = OPTIONS[key][0]
    value = (getattr(shared.opts, "data", None) or {}).get(key)
    if value is None or (isinstance(value, str) and not value.strip() and default != ""):
        return default
    return value


def models_dir() -> Path:
    return Path(paths.models_path)


def setting_roots() -> list[Path]:
    """Where a setting may name files and folders: the WebUI's models and data folders (settings can be set
    through /sdapi/v1/options, so they are confined like a request's parameters)."""
    return [models_dir(), Path(getattr(paths, "data_path", models_dir()))]


def setting_path(key: str, value: str, folder: bool) -> Path:
    """A file or folder a setting names, confined to :func:`setting_roots` (a relative value is relative to the
    models folder); InvalidInput naming the setting, without the server path, otherwise."""
    label = f"Settings > GMI > {OPTIONS[key][1]}"
    path = Path(value)
    real = (path if path.is_absolute() else models_dir() / path).resolve()
    given = "(an absolute path)" if path.is_absolute() else repr(value[:200])
    if not any(inside(real, root) for root in setting_roots()):
        raise InvalidInput(f"{label} {given} is outside the WebUI's models and data folders; choose one inside them")
    if not folder and not real.is_file():
        raise NotFound(f"{label} {given} is not a file; put the encoder file in models/gmi/clip")
    return real


def setting_shown(value: str) -> str:
    """A setting's file as answers show it: relative to the models folder, never the server path."""
    for root in (models_dir(), models_dir().resolve()):
        try:
            return str(Path(value).relative_to(root))
        except ValueError:
            continue
    return shown(value) if Path(value).is_absolute() else value


def spec_dir() -> Path:
    configured = str(opt("gmi_spec_dir") or "").strip()
    return setting_path("gmi_spec_dir", configured, folder=True) if configured else models_dir() / "gmi"


def encoder_setting() -> str:
    """The encoder: GMI_A1111_ENCODER (the server's environment), else the setting: a known name, or a file
    confined like a request parameter (:func:`setting_path`)."""
    if os.environ.get(ENV_ENCODER):
        return os.environ[ENV_ENCODER]
    name = str(opt("gmi_encoder"))
    return name if parse_encoder_name(name) is not None else str(setting_path("gmi_encoder", name, folder=False))


def prompt_set_roots() -> list[Path]:
    """Where prompt-set files may live: gmi's own folders and the WebUI's models folder."""
    return [spec_dir() / "prompt_sets", spec_dir(), models_dir()]


def encoder_download_dir() -> Path:
    """Where gmi keeps (and downloads) CLIP weights: models/gmi/clip."""
    return models_dir() / "gmi" / "clip"


def encoder_own_dirs() -> list[Path]:
    """gmi's CLIP folders: every .safetensors there is checked by its header."""
    return [encoder_download_dir(), Path.home() / ".cache" / "gmi" / "clip"]


def encoder_search_dirs() -> list[Path]:
    """The WebUI's other model folders where CLIP weights may sit (known file names only)."""
    dirs = [models_dir() / "CLIP", models_dir() / "clip", models_dir() / "clip_vision"]
    clip_models_path = getattr(shared.cmd_opts, "clip_models_path", None)
    if clip_models_path:
        dirs.append(Path(clip_models_path))
    dirs.append(models_dir() / "interrogate")
    return dirs


def interrogator_pickles(name: str) -> list[Path]:
    """The WebUI interrogator's OpenAI TorchScript file (``clip.load`` saves it): named in errors, never read."""
    entry = parse_encoder_name(name)
    if entry is None or entry.pretrained != "openai":
        return []
    folders = [Path(p) for p in (getattr(shared.cmd_opts, "clip_models_path", None),) if p] + [
        Path.home() / ".cache" / "clip"
    ]
    return [folder / f"{entry.model}.pt" for folder in folders]


@dataclass(frozen=True)
class Config:
    encoder: str
    allow_download: bool
    spec_root: Path
    prompt_set: str
    budget: Budget
    settings: FamilySettings

    @classmethod
    def from_opts(cls, **overrides) -> Config:
        """Settings > GMI, with per-request ``overrides`` (budget, sampler, scheduler, prompt_set; steps, cfg, width
        and height apply to every family)."""
        if not isinstance(overrides.get("prompt_set") or "", str):
            raise InvalidInput("prompt_set must be a name")
        base = GenerationSettings(
            sampler=str(overrides.get("sampler") or opt("gmi_sampler")),
            scheduler=str(overrides.get("scheduler") or opt("gmi_scheduler")),
        )
        every = {name: overrides[name] for name in PER_FAMILY_FIELDS if overrides.get(name) is not None}
        per_family = {  # Settings > GMI has rows for the families this host renders; overrides apply to all
            family: {
                **{
                    name: opt(family_option(family, name))
                    for name in PER_FAMILY_FIELDS
                    if family in forge.HOST_FAMILIES
                },
                **every,
            }
            for family in FAMILIES
        }
        return cls(
            encoder=encoder_setting(),
            allow_download=bool(opt("gmi_allow_download")),
            spec_root=spec_dir(),
            prompt_set=str(overrides.get("prompt_set") or opt("gmi_prompt_set")),
            budget=parse_budget(str(overrides.get("budget") or opt("gmi_budget"))),  # parsed here, once
            settings=FamilySettings.defaults(base, per_family),
        )


_lock = threading.RLock()
_queue_state = threading.local()
_prompt_sets: dict[str, PromptSet] = {}


def _encoder_placement() -> Placement:
    """The interrogator's device (``--use-cpu interrogate`` applies), fp16 unless ``--no-half``; with
    ``--lowvram``/``--medvram`` the encoder goes back to the CPU after every use."""
    from modules import devices

    device = torch.device(getattr(devices, "device_interrogate", None) or "cpu")
    dtype = torch.float32 if device.type == "cpu" or getattr(shared.cmd_opts, "no_half", False) else torch.float16
    low_vram = getattr(shared.cmd_opts, "lowvram", False) or getattr(shared.cmd_opts, "medvram", False)
    return (OffloadAfterUse if low_vram else Placement)(device, dtype)


def _download_progress():
    """The WebUI's progress text and a byte bar on the console while CLIP weights download."""
    console = console_download_bar()

    def update(done: int, total: int) -> None:
        percent = int(100 * done / max(total, 1))
        shared.state.textinfo = f"gmi: downloading CLIP weights {percent}% of {total / 2**20:.0f} MB"
        console(done, total)

    return update


@contextmanager
def holding_queue_lock():
    """Marks code that runs while this thread holds the WebUI's queue lock (a build job, a script in a generation)."""
    previous = getattr(_queue_state, "held", False)
    _queue_state.held = True
    try:
        yield
    finally:
        _queue_state.held = previous


@contextmanager
def webui_model_loading_excluded():
    """No WebUI checkpoint load runs meanwhile: while one runs, InitializeOnMeta makes torch's Module.to
    return None, so loading another model then fails. Loads run under the queue lock (switches, overrides)
    or under ``sd_models.model_data.lock`` (the first load at start-up); take both, in the WebUI's order."""
    with ExitStack() as stack:
        if not getattr(_queue_state, "held", False):
            stack.enter_context(call_queue.queue_lock)
        model_lock = getattr(getattr(sd_models, "model_data", None), "lock", None)
        if model_lock is not None:
            stack.enter_context(model_lock)
        yield


POOL = service.EnginePool(loading_guard=webui_model_loading_excluded)  # bounded: 2 encoders, 8 engines


def get_encoder(config: Config, wait: bool = True) -> ClipEncoder:
    def load() -> ClipEncoder:
        try:
            encoder = open_encoder(
                config.encoder,
                EncoderFolders(encoder_own_dirs(), encoder_search_dirs(), encoder_download_dir()),
                config.allow_download,
                placement=_encoder_placement(),
                progress=_download_progress(),
                pickle_files=interrogator_pickles(config.encoder),
            )
        except EncoderUnavailable as exc:
            raise EncoderUnavailable(f"{exc} (or choose another encoder in Settings > GMI)") from exc
        log.info("gmi: CLIP encoder %s loaded from %s", encoder.encoder_id, encoder.source)
        return encoder

    return POOL.encoder((config.encoder, config.allow_download), load, wait=wait)


def warm_in_background() -> threading.Thread | None:
    """Load the encoder and its label embeddings off the start-up path (Settings > GMI > warm start)."""
    return service.warm_in_background(get_engine) if opt("gmi_warm_start") else None


def get_prompt_set(name: str, from_request: bool = False) -> PromptSet:
    """A built-in set, or a file inside :func:`prompt_set_roots`; a request may only name it relatively."""
    if name in BUILTIN_SETS:
        path = name
    else:
        path = str(resolve_inside(name, prompt_set_roots(), "prompt set", allow_absolute=not from_request))
    with _lock:
        if path not in _prompt_sets:
            _prompt_sets[path] = load_prompt_set(path)
        return _prompt_sets[path]


def get_engine(wait: bool = True, **overrides) -> Gmi:
    """The engine for the settings plus ``overrides`` (from a request or the tab: checked like request input).
    ``wait=False``: raise EncoderLoading instead of waiting for the encoder (read routes)."""
    return _engine_for(Config.from_opts(**overrides), overrides, wait)


def _engine_for(config: Config, overrides: dict, wait: bool) -> Gmi:
    prompt_set = get_prompt_set(config.prompt_set, from_request=bool(overrides.get("prompt_set")))
    encoder = get_encoder(config, wait)  # wait=True may wait for the WebUI's model loading
    return POOL.engine(encoder, config.spec_root, prompt_set, config.budget, config.settings)


def reset() -> None:
    """Forget loaded encoders, engines and prompt sets (Settings > GMI changes; tests)."""
    POOL.clear()
    with _lock:
        _prompt_sets.clear()


def source(on_hashing=None):
    """The WebUI's checkpoints, and its LoRA combinations as Settings > GMI asks (gmi_a1111.loras)."""
    cache = spec_dir() / HASH_CACHE_FILE
    return loras.model_source(WebuiCheckpointSource(hash_cache=cache, on_hashing=on_hashing), cache, opt)


def generator() -> WebuiGenerator:
    return WebuiGenerator(WebuiCheckpointSource(hash_cache=spec_dir() / HASH_CACHE_FILE))


def titles_by_sha() -> dict[str, str]:
    return {info.sha256: info.title for info in webui_checkpoints() if getattr(info, "sha256", None)}


def identify(
    images, prompt: str | None = None, method: str | None = None, top_k: int | None = None, thumbnails: bool = False
) -> tuple[IdentifyResult, dict]:
    """Rank the WebUI's checkpoints for reference images: the shared identify payload, with WebUI titles and,
    if asked, the matching spec images as data URIs."""
    engine = get_engine()
    result = service.identify(
        engine, images, source(), prompt, method or str(opt("gmi_method")), bool(opt("gmi_include_not_installed"))
    )
    data = service.identify_payload(
        result,
        service.data_uri_thumbnails(engine) if thumbnails else None,
        titles_by_sha(),
        top_k=top_k or int(opt("gmi_top_k")),
    )
    return result, data


def status(on_hashing=None, wait: bool = True, **overrides) -> dict:
    """The shared status payload; ``config`` holds the Settings > GMI values it was computed for. ``wait=False``
    (the routes and the tab) never waits for the encoder, whose load a build holds off for its whole length
    (the WebUI's queue lock): "loading" until it is there."""
    config = Config.from_opts(**overrides)  # once per request
    sampling = config.settings.rows[0][1]
    shown = {
        "encoder": setting_shown(config.encoder),
        "prompt_set": config.prompt_set,
        "budget": config.budget.name or config.budget.size_label(),
        "sampler": sampling.sampler,
        "scheduler": sampling.scheduler,
    }
    try:
        engine = _engine_for(config, overrides, wait)
    except EncoderLoading as exc:
        return service.status_loading_payload(shown, exc)
    return service.status_payload(
        engine,
        source(on_hashing),
        titles=titles_by_sha(),
        config=shown,
        empty_note="the WebUI lists no checkpoints: put Stable Diffusion checkpoints in models/Stable-diffusion",
    )
