"""Settings -> one gmi_core engine per configuration; the CLIP encoder resolved the WebUI way.

Holds no WebUI UI code; used by the tab, the API routes, the build job and the auto-select script.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from modules import paths, shared

from gmi_core.encoder_registry import DEFAULT_ENCODER, parse_encoder_name
from gmi_core.encoders import ClipEncoder, OffloadAfterUse, Placement, load_encoder
from gmi_core.engine import Gmi, IdentifyResult
from gmi_core.errors import EncoderUnavailable, GmiError
from gmi_core.prompts import PromptSet, load_prompt_set
from gmi_core.protocols import GenerationSettings

from .host import WebuiCheckpointSource, WebuiGenerator, WebuiSwitcher, webui_checkpoints

log = logging.getLogger("gmi")

ENV_ENCODER = "GMI_A1111_ENCODER"  # overrides the encoder setting (tests, headless servers)

# option key -> (default, label); registered by scripts/gmi_settings.py
OPTIONS: dict[str, tuple[object, str]] = {
    "gmi_encoder": (DEFAULT_ENCODER, "CLIP encoder: ViT-L-14/openai, ViT-B-16/openai, ViT-B-32/openai, or a path to a gmi encoder .safetensors"),
    "gmi_allow_download": (True, "Download the CLIP encoder's weights on first use (into models/gmi/clip; off: never download)"),
    "gmi_warm_start": (False, "After start, load the CLIP encoder and label embeddings in the background"),
    "gmi_spec_dir": ("", "Spec folder (empty: models/gmi in the WebUI's models folder)"),
    "gmi_prompt_set": ("platform", "Prompt set: 'platform' or a path to a JSON list / text file of prompts"),
    "gmi_images_per_prompt": (4, "Images per prompt when building specs"),
    "gmi_steps": (20, "Sampling steps when building specs"),
    "gmi_cfg": (7.0, "CFG scale when building specs"),
    "gmi_width": (512, "Width of spec images"),
    "gmi_height": (512, "Height of spec images"),
    "gmi_sampler": ("Euler", "Sampler for spec images"),
    "gmi_scheduler": ("Automatic", "Schedule type for spec images"),
    "gmi_top_k": (5, "Checkpoints shown in a ranking"),
    "gmi_method": ("gmi", "Ranking method"),
}


def opt(key: str):
    """A gmi option's value from shared.opts.data, its default when unset or blank."""
    default = OPTIONS[key][0]
    value = (getattr(shared.opts, "data", None) or {}).get(key)
    if value is None or (isinstance(value, str) and not value.strip() and default != ""):
        return default
    return value


def models_dir() -> Path:
    return Path(paths.models_path)


def spec_dir() -> Path:
    configured = str(opt("gmi_spec_dir") or "").strip()
    return Path(configured) if configured else models_dir() / "gmi"


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
    folders = [Path(p) for p in (getattr(shared.cmd_opts, "clip_models_path", None),) if p] + [Path.home() / ".cache" / "clip"]
    return [folder / f"{entry.model}.pt" for folder in folders]


@dataclass(frozen=True)
class Config:
    encoder: str
    allow_download: bool
    spec_root: Path
    prompt_set: str
    images_per_prompt: int
    settings: GenerationSettings

    @classmethod
    def from_opts(cls, **overrides) -> Config:
        settings = GenerationSettings(
            steps=int(overrides.get("steps") or opt("gmi_steps")),
            cfg=float(overrides.get("cfg") or opt("gmi_cfg")),
            sampler=str(overrides.get("sampler") or opt("gmi_sampler")),
            scheduler=str(overrides.get("scheduler") or opt("gmi_scheduler")),
            width=int(overrides.get("width") or opt("gmi_width")),
            height=int(overrides.get("height") or opt("gmi_height")),
        )
        return cls(
            encoder=os.environ.get(ENV_ENCODER) or str(opt("gmi_encoder")),
            allow_download=bool(opt("gmi_allow_download")),
            spec_root=spec_dir(),
            prompt_set=str(overrides.get("prompt_set") or opt("gmi_prompt_set")),
            images_per_prompt=int(overrides.get("images_per_prompt") or opt("gmi_images_per_prompt")),
            settings=settings,
        )


_lock = threading.RLock()
_encoders: dict[tuple, ClipEncoder] = {}
_engines: dict[Config, Gmi] = {}
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
    """The WebUI's progress text (and the console) while CLIP weights download."""
    shown = {"percent": -1}

    def update(done: int, total: int) -> None:
        percent = int(100 * done / max(total, 1))
        shared.state.textinfo = f"gmi: downloading CLIP weights {percent}% of {total / 2**20:.0f} MB"
        if percent // 10 != shown["percent"] // 10:
            log.info("gmi: CLIP weights download %d%% (into %s)", percent, encoder_download_dir())
        shown["percent"] = percent

    return update


def get_encoder(config: Config) -> ClipEncoder:
    key = (config.encoder, config.allow_download)
    with _lock:
        if key in _encoders:
            return _encoders[key]
        try:
            encoder = load_encoder(
                config.encoder, search_dirs=encoder_search_dirs(), own_dirs=encoder_own_dirs(),
                allow_download=config.allow_download, download_dir=encoder_download_dir(),
                placement=_encoder_placement(), progress=_download_progress(),
                pickle_files=interrogator_pickles(config.encoder),
            )
        except EncoderUnavailable as exc:
            raise EncoderUnavailable(f"{exc} (or choose another encoder in Settings > GMI)") from exc
        _encoders[key] = encoder
        log.info("gmi: CLIP encoder %s loaded from %s", encoder.encoder_id, encoder.source)
        return encoder


def warm_in_background() -> threading.Thread | None:
    """Load the encoder and its label embeddings off the start-up path (Settings > GMI > warm start)."""
    if not opt("gmi_warm_start"):
        return None

    def warm() -> None:
        try:
            get_engine().warm()
        except GmiError as exc:
            log.info("gmi: background warm-up skipped: %s", exc)

    thread = threading.Thread(target=warm, name="gmi-warm", daemon=True)
    thread.start()
    return thread


def get_prompt_set(name: str) -> PromptSet:
    with _lock:
        if name not in _prompt_sets:
            _prompt_sets[name] = load_prompt_set(name)
        return _prompt_sets[name]


def get_engine(**overrides) -> Gmi:
    config = Config.from_opts(**overrides)
    with _lock:
        engine = _engines.get(config)
        if engine is None:
            engine = Gmi(
                spec_root=config.spec_root,
                encoder=get_encoder(config),
                prompt_set=get_prompt_set(config.prompt_set),
                images_per_prompt=config.images_per_prompt,
                settings=config.settings,
            )
            _engines[config] = engine
        return engine


def reset() -> None:
    """Forget loaded encoders and engines (tests; settings changes of the encoder)."""
    with _lock:
        _encoders.clear()
        _engines.clear()
        _prompt_sets.clear()


def source() -> WebuiCheckpointSource:
    return WebuiCheckpointSource(hash_cache=spec_dir() / "cache" / "sha256.json")


def generator() -> WebuiGenerator:
    return WebuiGenerator(source())


def switcher() -> WebuiSwitcher:
    return WebuiSwitcher(source())


def titles_by_sha() -> dict[str, str]:
    return {info.sha256: info.title for info in webui_checkpoints() if getattr(info, "sha256", None)}


def image_to_data_uri(image, size: int | None = None) -> str:
    if size:
        image = image.copy()
        image.thumbnail((size, size))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def identify(images, prompt: str | None = None, method: str | None = None, top_k: int | None = None,
             thumbnails: bool = False) -> tuple[IdentifyResult, dict]:
    """Rank the WebUI's checkpoints for reference images; the dict adds each entry's WebUI title."""
    engine = get_engine()
    result = engine.identify(images, prompt=prompt or None, method=method or str(opt("gmi_method")),
                             top_k=top_k or int(opt("gmi_top_k")), source=source())
    data = result.to_dict()
    titles = titles_by_sha()
    for entry in data["ranking"]:
        entry["title"] = titles.get(entry["sha256"], entry["name"])
        if thumbnails:
            for match in entry["top_prompts"]:
                try:
                    match["thumbnail"] = image_to_data_uri(engine.spec_thumbnail(entry["sha256"], match["index"]))
                except GmiError:
                    match["thumbnail"] = None
    return result, data


def status(**overrides) -> dict:
    engine = get_engine(**overrides)
    statuses, skipped = engine.status(source())
    titles = titles_by_sha()
    return {
        "encoder": engine.encoder.encoder_id,
        "spec_dir": str(engine.store.root),
        "prompt_set": {"name": engine.prompt_set.name, "hash": engine.prompt_set.hash, "size": len(engine.prompt_set)},
        "images_per_prompt": engine.images_per_prompt,
        "settings": engine.settings.to_dict(),
        "checkpoints": [
            {
                "name": s.name,
                "title": titles.get(s.sha256, s.name),
                "sha256": s.sha256,
                "short_hash": s.sha256[:10],
                "state": s.state,
                "prompts_done": s.prompts_done,
                "prompts_total": s.prompts_total,
                "detail": s.detail,
            }
            for s in statuses
        ],
        "skipped": [{"name": s.name, "reason": s.reason} for s in skipped],
    }
