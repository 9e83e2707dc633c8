"""The host service layer: what both hosts' routes, tabs and nodes call, written once.

The adapters (``nodes/`` for ComfyUI, ``gmi_a1111/`` for A1111) translate a request into these calls and the
answer into their transport; they add only what is host-specific (folders, titles, the thumbnail address).

* :class:`EnginePool`: bounded caches of encoders and engines (an evicted encoder takes its engines along);
* :func:`status_payload`: the one spec-status answer (ComfyUI ``/gmi/status``, A1111 ``/gmi/v1/specs``);
* :func:`identify` / :func:`identify_payload`: the one identify answer, with thumbnail references;
* :func:`pick_installed`: which checkpoint a host switches to;
* :func:`defaults_payload`: every generation default and limit, for the front ends' forms.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from PIL import Image

from .budgets import BUDGETS, DEFAULT_BUDGET, Budget
from .encoders import ClipEncoder
from .engine import Gmi
from .errors import Busy, CheckpointError, EncoderLoading, EncoderUnavailable, GmiError, NoSpecsError, NotFound
from .factory import make_engine
from .families import FAMILIES, FAMILY_DEFAULTS, LIMITS, FamilySettings
from .limits import (
    DEFAULT_TOP_K,
    MAX_PROMPT_SET_PROMPTS,
    MAX_SEED,
    MAX_TEXT_FIELD,
    MAX_TOP_K,
    READ_ROUTE_WAIT_S,
    SIZE_STEP,
    UploadTooLarge,
    json_safe,
)
from .prompts import PromptSet
from .protocols import CheckpointSource, GenerationSettings
from .ranker import DEFAULT_METHOD, METHODS
from .results import IdentifyResult, RankedCheckpoint

log = logging.getLogger("gmi")
ThumbnailRef = Callable[[str, str, int], "str | None"]  # (sha256, prompt_set_hash, spec row) -> URL or data URI


class EnginePool:
    """Encoders and engines, kept while used: at most ``max_encoders`` encoders and ``max_engines`` engines,
    the least recently used dropped first. Dropping an encoder drops every engine built on it, so nothing
    keeps its weights alive. ``loading_guard`` is entered around an encoder load (A1111: the WebUI's model
    loading locks, taken before the pool's own lock)."""

    def __init__(
        self,
        max_encoders: int = 2,
        max_engines: int = 8,
        loading_guard: Callable[[], AbstractContextManager] = nullcontext,
    ):
        self.max_encoders, self.max_engines = max_encoders, max_engines
        self.loading_guard = loading_guard
        self._lock = threading.RLock()
        self._loading = threading.Lock()
        self._encoders: OrderedDict[object, ClipEncoder] = OrderedDict()
        self._engines: OrderedDict[tuple, Gmi] = OrderedDict()
        self._background: dict[object, threading.Thread] = {}
        self._failed: dict[object, GmiError] = {}

    def encoder(self, key, load: Callable[[], ClipEncoder], wait: bool = True) -> ClipEncoder:
        """The encoder cached under ``key``, else ``load()`` (one load at a time, outside the pool's lock).

        ``wait=False`` (read routes: status, options, anything a UI polls) never waits on the host's model-loading
        exclusion, which a running build may hold for its whole length: the load runs in the background, and if it
        has not finished within ``limits.READ_ROUTE_WAIT_S`` :class:`EncoderLoading` is raised; a failed background
        load is raised on the next ask."""
        with self._lock:
            if key in self._encoders:
                self._encoders.move_to_end(key)
                return self._encoders[key]
            if not wait:
                failed = self._failed.pop(key, None)
                if failed is not None:
                    raise failed
                loader = self._load_in_background(key, load)
        if not wait:
            loader.join(READ_ROUTE_WAIT_S)
            with self._lock:
                if key in self._encoders:
                    return self._encoders[key]
                if key in self._failed:
                    raise self._failed.pop(key)
            raise EncoderLoading("the CLIP encoder is loading (a build may be holding the model loader); ask again")
        with self.loading_guard(), self._loading:
            with self._lock:
                if key in self._encoders:
                    return self._encoders[key]
            encoder = load()
            with self._lock:
                self._encoders[key] = encoder
                self._trim()
        gc.collect()  # the dropped encoders' weights go now, not at some later collection
        return encoder

    def _load_in_background(self, key, load: Callable[[], ClipEncoder]) -> threading.Thread:
        """One daemon load per key (called under the pool's lock); its error is kept for the next ask."""
        running = self._background.get(key)
        if running is not None and running.is_alive():
            return running

        def run() -> None:
            try:
                self.encoder(key, load)
            except GmiError as exc:
                with self._lock:
                    self._failed[key] = exc
            except Exception as exc:  # kept as a one-line error for the next ask, never lost
                log.exception("gmi: background encoder load failed")
                with self._lock:
                    self._failed[key] = EncoderUnavailable(
                        f"the CLIP encoder could not be loaded ({type(exc).__name__})"
                    )

        thread = threading.Thread(target=run, name="gmi-encoder-load", daemon=True)
        self._background[key] = thread
        thread.start()
        return thread

    def engine(
        self,
        encoder: ClipEncoder,
        spec_root: Path,
        prompt_set: PromptSet,
        budget: Budget,
        settings: FamilySettings | None = None,
        base_seed: int = 0,
    ) -> Gmi:
        """The engine for these settings over ``spec_root`` (built once, then reused); ``budget`` parsed where the
        request came in (:func:`gmi_core.budgets.parse_budget`)."""
        settings = settings or FamilySettings.defaults()
        key = (id(encoder), str(spec_root), prompt_set.hash, budget, settings, base_seed)
        with self._lock:
            engine = self._engines.get(key)
            if engine is None or engine.encoder is not encoder:
                engine = make_engine(spec_root, encoder, prompt_set, budget, settings, base_seed)
                self._engines[key] = engine
            self._engines.move_to_end(key)
            self._trim()
            return engine

    def _trim(self) -> None:
        """Drops the least recently used entries over the bounds, and the engines of a dropped encoder."""
        while len(self._encoders) > self.max_encoders:
            _, encoder = self._encoders.popitem(last=False)
            for key in [k for k, e in self._engines.items() if e.encoder is encoder]:
                del self._engines[key]
        while len(self._engines) > self.max_engines:
            self._engines.popitem(last=False)

    def clear(self) -> None:
        """Forget every encoder and engine (settings changes, tests)."""
        with self._lock:
            self._encoders.clear()
            self._engines.clear()
            self._failed.clear()
        gc.collect()


# -- status ------------------------------------------------------------------------------------
def status_payload(
    engine: Gmi, source: CheckpointSource, config: dict, titles: dict[str, str] | None = None, empty_note: str = ""
) -> dict:
    """Per-checkpoint spec state, the same keys in both hosts. ``config``: the host's settings this answer is
    for (ComfyUI: the panel's build inputs; A1111: Settings > GMI); ``titles``: sha256 -> the host's display
    name; ``empty_note``: what to say when the host lists no checkpoint file at all."""
    statuses, skipped = engine.status(source)
    titles = titles or {}
    rows = [{**vars(s), "short_hash": s.sha256[:10], "title": titles.get(s.sha256, s.name)} for s in statuses]
    return json_safe(
        {
            "config": config,
            "encoder_id": engine.encoder.encoder_id,
            "encoder_state": "ready",
            "prompt_set": {
                "name": engine.prompt_set.name,
                "hash": engine.prompt_set.hash,
                "size": len(engine.prompt_set),
            },
            "budget": engine.budget.to_dict(len(engine.prompt_set)),
            "images_missing": sum(s.images_missing for s in statuses if s.state != "ready"),
            "family_settings": engine.settings.to_dict(),
            "checkpoints": rows,
            "skipped": [{"name": s.name, "reason": s.reason} for s in skipped],
            "note": "" if statuses or skipped else empty_note,
        }
    )


def status_loading_payload(config: dict, exc: EncoderLoading) -> dict:
    """The status answer while the encoder loads: the same keys, no rows yet, ``encoder_state`` "loading"."""
    return {
        "config": config,
        "encoder_id": None,
        "encoder_state": "loading",
        "prompt_set": None,
        "budget": None,
        "images_missing": 0,
        "family_settings": {},
        "checkpoints": [],
        "skipped": [],
        "note": str(exc),
    }


# -- identify ----------------------------------------------------------------------------------
def pick_installed(result: IdentifyResult, rank: int = 1) -> RankedCheckpoint:
    """The ``rank``-th installed checkpoint of a ranking: the one a host switches to (imported specs of
    checkpoints that are not on this machine are ranked, never loaded)."""
    installed = [r for r in result.ranking if r.installed]
    if not 1 <= rank <= len(installed):
        raise GmiError(f"pick_rank {rank} but only {len(installed)} installed checkpoint(s) have specs")
    return installed[rank - 1]


def identify(
    engine: Gmi,
    images: Sequence[Image.Image],
    source,
    prompt: str | None = None,
    method: str = DEFAULT_METHOD,
    include_not_installed: bool = False,
) -> IdentifyResult:
    """The whole ranking for reference images (hosts cut it to their top k in :func:`identify_payload`)."""
    return engine.identify(
        images, prompt=prompt or None, method=method, source=source, include_not_installed=include_not_installed
    )


def identify_payload(
    result: IdentifyResult,
    thumbnail: ThumbnailRef | None = None,
    titles: dict[str, str] | None = None,
    top_k: int | None = None,
    pick_rank: int = 1,
) -> dict:
    """The one identify answer: the engine's result, each row's host ``title``, each matching spec image's
    ``thumbnail`` reference (a route URL in ComfyUI, a data URI in A1111, or None), and ``chosen``: the name
    of the installed checkpoint at ``pick_rank`` (None when no installed one is ranked). ``top_k`` cuts the
    rows (never above the chosen one)."""
    data = result.to_dict()
    titles = titles or {}
    try:
        chosen = pick_installed(result, pick_rank)
    except GmiError:
        chosen = None
    for row in data["ranking"]:
        row["title"] = titles.get(row["sha256"], row["name"])
        for match in row["top_prompts"]:
            match["thumbnail"] = (
                thumbnail(row["sha256"], match["prompt_set_hash"], match["spec_index"]) if thumbnail else None
            )
    data["chosen"] = chosen.name if chosen else None
    if top_k:
        data["ranking"] = data["ranking"][: max(int(top_k), chosen.rank if chosen else 0)]
    return json_safe(data)


def refine(
    engine: Gmi,
    images: Sequence[Image.Image],
    source,
    generator,
    prompt: str | None = None,
    method: str = DEFAULT_METHOD,
    include_not_installed: bool = False,
    max_images: int | None = None,
    progress=None,
    should_cancel=None,
):
    """:func:`identify`, and when its ranking is ambiguous the contenders' specs topped up with the host's
    ``generator`` and ranked again (:func:`gmi_core.refine.refine`); answer with :func:`refine_payload`."""
    from .refine import refine as refine_ranking

    return refine_ranking(
        engine,
        images,
        source,
        generator,
        max_images=max_images or None,
        progress=progress,
        should_cancel=should_cancel,
        prompt=prompt or None,
        method=method,
        include_not_installed=include_not_installed,
    )


def refine_payload(refined, thumbnail=None, titles=None, top_k=None, pick_rank: int = 1) -> dict:
    """:func:`identify_payload` of the refined ranking plus ``refine``: the ranking before, the images rendered."""
    data = identify_payload(refined.after, thumbnail, titles, top_k, pick_rank)
    data["refine"] = json_safe(refined.summary())
    if top_k:
        data["refine"]["before"]["ranking"] = data["refine"]["before"]["ranking"][: int(top_k)]
    return data


def data_uri_thumbnails(engine: Gmi, size: int | None = None) -> ThumbnailRef:
    """Thumbnail references as PNG data URIs, read from the spec files (for HTML without a route)."""
    from .images import png_data_uri

    def ref(sha256: str, prompt_set_hash: str, index: int) -> str | None:
        try:
            return png_data_uri(engine.library.thumbnail(sha256, index, prompt_set_hash), size)
        except GmiError:
            return None

    return ref


# -- specs without generating ------------------------------------------------------------------
def import_images_payload(engine: Gmi, source: CheckpointSource, folder: Path) -> dict:
    """Observed specs from the images in ``folder`` (a folder the host has confined to one of its roots)."""
    from .observed import import_images

    return json_safe(import_images(engine, source.list_checkpoints(), folder).to_dict())


def map_payload(engine: Gmi, source: CheckpointSource) -> dict:
    """Near-duplicate groups and 2-D coordinates of the checkpoints with specs (without the M x M distance
    matrix, large for big libraries: ``gmi map --json`` has it)."""
    from .library_map import build_map

    loaded = engine.library.load(source, include_not_installed=True)
    if not loaded.items:
        return {"checkpoints": [], "groups": [], "excluded": [{"name": n, "reason": r} for n, r in loaded.excluded]}
    data = build_map(
        loaded.specs, engine.prompt_features, excluded=loaded.excluded, installed=loaded.installed
    ).to_dict()
    data.pop("relative_distance")
    return json_safe(data)


def warm_in_background(engine: Callable[[], Gmi]) -> threading.Thread:
    """What the first identification needs (encoder, label and prompt embeddings), loaded off the start-up path
    in a daemon thread; a missing encoder is logged, never raised."""

    def warm() -> None:
        try:
            engine().warm()
        except GmiError as exc:
            log.info("gmi: background warm-up skipped: %s", exc)

    thread = threading.Thread(target=warm, name="gmi-warm", daemon=True)
    thread.start()
    return thread


# -- errors ------------------------------------------------------------------------------------
def http_status(exc: Exception) -> int:
    """One mapping from gmi's errors to HTTP statuses for both hosts: the client's fault 4xx, the server's 5xx
    (the message for the body: :func:`gmi_core.paths.one_line`, one line without server paths)."""
    if isinstance(exc, UploadTooLarge):
        return 413
    if isinstance(exc, (NotFound, CheckpointError)):
        return 404
    if isinstance(exc, (NoSpecsError, Busy)):
        return 409
    if isinstance(exc, (EncoderUnavailable, OSError)):
        return 503
    if isinstance(exc, GmiError):  # InvalidInput, ImageError and the rest: the request cannot be served as sent
        return 400
    return 500


# -- defaults and limits -----------------------------------------------------------------------
def defaults_payload() -> dict:
    """Every default and limit of a build and an identification, from the one place each lives
    (:mod:`gmi_core.families`, :mod:`gmi_core.limits`, :mod:`gmi_core.budgets`): front ends build their forms
    and requests from it instead of repeating them."""
    generation = GenerationSettings().to_dict()
    return {
        "generation": generation,
        "families": {family: dict(FAMILY_DEFAULTS[family]) for family in FAMILIES},
        "budgets": {name: budget.label() for name, budget in BUDGETS.items()},
        "budget": DEFAULT_BUDGET,
        "method": DEFAULT_METHOD,
        "methods": list(METHODS),
        "top_k": DEFAULT_TOP_K,
        "seed": 0,
        "limits": {
            **{name: {"min": lo, "max": hi} for name, (lo, hi) in LIMITS.items()},
            "size_step": SIZE_STEP,
            "seed": {"min": 0, "max": MAX_SEED},
            "max_prompts": {"min": 0, "max": MAX_PROMPT_SET_PROMPTS},
            "top_k": {"min": 0, "max": MAX_TOP_K},
            "text": MAX_TEXT_FIELD,
        },
    }
