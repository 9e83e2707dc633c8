"""The facade every host uses: spec status, building, interrogation and identification."""

from __future__ import annotations

import ctypes
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .builder import build_spec
from .encoders import ClipEncoder
from .errors import Cancelled, CheckpointError, GmiError, NoSpecsError, SpecError
from .images import to_rgb
from .interrogator import Interrogator
from .prompts import PromptSet, load_prompt_set
from .protocols import (
    CheckpointInfo,
    CheckpointListing,
    CheckpointSource,
    GenerationSettings,
    Generator,
    ProgressCallback,
    SkippedCheckpoint,
)
from .ranker import DEFAULT_METHOD, FeatureBank, rank
from .spec import Spec, SpecKey, pixel_feature
from .spec_cache import VerifiedSpecs
from .store import ManifestEntry, SpecStore

log = logging.getLogger(__name__)
STATES = ("ready", "partial", "missing", "stale", "corrupt")


def _return_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc). Stacking the bank frees one spec's features at a time,
    and glibc would otherwise keep those pages: the process would hold the features twice."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


@dataclass
class SpecStatus:
    name: str
    sha256: str
    state: str  # one of STATES
    prompts_done: int
    prompts_total: int
    detail: str = ""


@dataclass
class BuildReport:
    built: list[str] = field(default_factory=list)
    skipped: list[SkippedCheckpoint] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    cancelled: bool = False

    def to_dict(self) -> dict:
        return {
            "built": self.built,
            "skipped": [{"name": s.name, "reason": s.reason} for s in self.skipped],
            "failed": [{"name": n, "reason": r} for n, r in self.failed],
            "cancelled": self.cancelled,
        }


@dataclass
class PromptMatch:
    index: int
    prompt: str
    weight: float
    contribution: float


@dataclass
class RankedCheckpoint:
    rank: int
    name: str
    sha256: str
    score: float
    top_prompts: list[PromptMatch]

    @property
    def short_hash(self) -> str:
        return self.sha256[:10]


@dataclass
class IdentifyResult:
    method: str
    pseudo_prompt: str
    prompt_source: str  # "user" or "interrogator"
    gamma: float | None
    ranking: list[RankedCheckpoint]
    excluded: list[tuple[str, str]] = field(default_factory=list)

    @property
    def best(self) -> RankedCheckpoint:
        return self.ranking[0]

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "pseudo_prompt": self.pseudo_prompt,
            "prompt_source": self.prompt_source,
            "gamma": self.gamma,
            "ranking": [
                {
                    "rank": r.rank,
                    "name": r.name,
                    "sha256": r.sha256,
                    "short_hash": r.short_hash,
                    "score": r.score,
                    "top_prompts": [asdict(p) for p in r.top_prompts],
                }
                for r in self.ranking
            ],
            "excluded": [{"name": n, "reason": r} for n, r in self.excluded],
        }


class Gmi:
    """One per host process: holds the encoder, the prompt set and the spec store."""

    def __init__(
        self,
        spec_root: Path,
        encoder: ClipEncoder,
        prompt_set: PromptSet | None = None,
        images_per_prompt: int = 4,
        settings: GenerationSettings | None = None,
        base_seed: int = 0,
    ):
        self.store = SpecStore(spec_root)
        self.encoder = encoder
        self.prompt_set = prompt_set or load_prompt_set("platform")
        self.images_per_prompt = images_per_prompt
        self.settings = settings or GenerationSettings()
        self.base_seed = base_seed
        self.interrogator = Interrogator(encoder, cache_dir=self.store.root / "cache")
        self._prompt_features: torch.Tensor | None = None
        self._bank_cache: tuple[tuple, FeatureBank] | None = None
        self._spec_cache: dict[str, tuple[float, Spec | None]] = {}
        self._loaded_versions: tuple = ()  # (file, mtime) of the specs the last load_specs listed
        self._verified = VerifiedSpecs(self.store.root / "cache" / "verified_specs.json")

    @property
    def prompt_features(self) -> torch.Tensor:
        if self._prompt_features is None:
            self._prompt_features = self.encoder.encode_texts(list(self.prompt_set.prompts))
        return self._prompt_features

    def key(self, checkpoint: CheckpointInfo) -> SpecKey:
        return SpecKey(checkpoint.sha256, self.encoder.encoder_id, self.prompt_set.hash)

    # -- status --------------------------------------------------------------------------------
    def status(self, source: CheckpointSource) -> tuple[list[SpecStatus], list[SkippedCheckpoint]]:
        return self._status(source.list_checkpoints())

    def _status(self, listing: CheckpointListing) -> tuple[list[SpecStatus], list[SkippedCheckpoint]]:
        by_key = {e.key: e for e in self.store.entries()}
        statuses = []
        for ckpt in listing.checkpoints:
            total = len(self.prompt_set)
            entry = by_key.get(self.key(ckpt))
            if entry is None:
                corrupt = self.store.path_for(self.key(ckpt)).exists()
                state = "corrupt" if corrupt else "missing"
                statuses.append(SpecStatus(ckpt.name, ckpt.sha256, state, 0, total))
                continue
            fresh = entry.images_per_prompt == self.images_per_prompt and GenerationSettings.from_dict(
                entry.settings
            ) == self.settings and entry.prompts_total == total
            if not fresh:
                state, detail = "stale", "built with other settings"
            else:
                state, detail = ("ready" if entry.complete else "partial"), ""
            statuses.append(SpecStatus(ckpt.name, ckpt.sha256, state, entry.prompts_done, total, detail))
        return statuses, listing.skipped

    # -- build ---------------------------------------------------------------------------------
    def build(
        self,
        source: CheckpointSource,
        generator: Generator,
        which: str | Sequence[str] = "missing",
        progress: ProgressCallback | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> BuildReport:
        """Build specs: ``which`` is "missing" (not ready), "all", or a list of checkpoint names."""
        checkpoints = source.list_checkpoints()
        statuses, skipped = self._status(checkpoints)
        report = BuildReport(skipped=list(skipped))
        listing = {c.name: c for c in checkpoints.checkpoints}
        if isinstance(which, str) and which not in ("missing", "all"):
            which = [which]
        if isinstance(which, str):
            names = [s.name for s in statuses if which == "all" or s.state != "ready"]
        else:
            unknown = [n for n in which if n not in listing]
            if unknown:
                raise CheckpointError(f"unknown checkpoint(s): {', '.join(unknown)}")
            names = list(which)
        for index, name in enumerate(names):
            ckpt = listing[name]
            try:
                build_spec(
                    store=self.store,
                    encoder=self.encoder,
                    prompt_set=self.prompt_set,
                    prompt_features=self.prompt_features,
                    checkpoint=ckpt,
                    generator=generator,
                    settings=self.settings,
                    images_per_prompt=self.images_per_prompt,
                    base_seed=self.base_seed,
                    progress=progress,
                    should_cancel=should_cancel,
                    position=(index, len(names)),
                    restart=which == "all",
                )
                report.built.append(name)
            except Cancelled:
                report.cancelled = True
                break
            except (GmiError, RuntimeError, ValueError, OSError) as exc:
                log.warning("gmi: building the spec of %s failed: %s", name, exc)
                report.failed.append((name, f"{type(exc).__name__}: {exc}"))
            finally:
                generator.release()
        return report

    # -- identify ------------------------------------------------------------------------------
    def warm(self) -> None:
        """Compute (or read from the disk cache) what the first identification would: label and prompt
        embeddings. Hosts call it from a background thread after start."""
        self.interrogator.label_embeddings()
        _ = self.prompt_features

    def interrogate(self, images: Sequence[Image.Image]) -> str:
        return self.interrogator.interrogate([to_rgb(i) for i in images])

    def load_specs(self, source: CheckpointSource | None = None) -> tuple[list[Spec], list[tuple[str, str]]]:
        """Usable specs for this encoder and prompt set, and (name, reason) for those left out."""
        excluded: list[tuple[str, str]] = []
        if source is not None:
            listing = source.list_checkpoints()
            wanted = {c.sha256: c for c in listing.checkpoints}
            excluded += [(s.name, s.reason) for s in listing.skipped]
        else:
            wanted = None
        entries = [e for e in self.store.entries() if e.encoder_id == self.encoder.encoder_id]
        entries = [e for e in entries if e.prompt_set_hash == self.prompt_set.hash]
        self._loaded_versions = tuple((e.file, e.mtime) for e in entries)  # the bank's key: no second store listing
        found = {e.sha256 for e in entries}
        if wanted is not None:
            excluded += [(c.name, self._why_unusable(c)) for sha, c in wanted.items() if sha not in found]
            entries = [e for e in entries if e.sha256 in wanted]
        specs = []
        for entry in entries:
            try:
                spec = self._load_cached(entry)
            except SpecError as exc:
                excluded.append((entry.checkpoint_name, str(exc)))
                continue
            if spec is None or not spec.done.any():
                excluded.append((entry.checkpoint_name, "spec has no finished prompt"))
                continue
            if wanted is not None:
                spec.checkpoint_name = wanted[spec.sha256].name
                spec.extra["popularity"] = wanted[spec.sha256].popularity
            specs.append(spec)
        self._verified.save()
        if specs:  # one ranking needs one shape: keep the most common images-per-prompt
            counts = Counter(s.images_per_prompt for s in specs)
            common = max(counts, key=lambda n: (counts[n], n == self.images_per_prompt))
            excluded += [(s.checkpoint_name, f"spec has {s.images_per_prompt} images per prompt, others {common}") for s in specs if s.images_per_prompt != common]
            specs = [s for s in specs if s.images_per_prompt == common]
        return specs, excluded

    def _load_cached(self, entry: ManifestEntry) -> Spec | None:
        """A spec's features, read once per process and file version; verified once per file version ever."""
        cached = self._spec_cache.get(entry.file)
        if cached is not None and cached[0] == entry.mtime:
            return cached[1]
        path = self.store.root / entry.file
        trusted = self._verified.trusted(path)
        spec = self.store.load(entry.key, verify=not trusted, thumbnails=False)
        if not trusted and spec is not None:
            self._verified.mark(path)
        self._spec_cache[entry.file] = (entry.mtime, spec)
        return spec

    def _why_unusable(self, checkpoint: CheckpointInfo) -> str:
        try:
            return "no spec yet" if self.store.load(self.key(checkpoint)) is None else "spec not listed"
        except SpecError as exc:
            return str(exc)

    def identify(
        self,
        images: Sequence[Image.Image],
        prompt: str | None = None,
        method: str = DEFAULT_METHOD,
        top_k: int | None = None,
        source: CheckpointSource | None = None,
        gamma: float | None = None,
        tau: float | None = None,
    ) -> IdentifyResult:
        if not images:
            raise GmiError("identify needs at least one reference image")
        specs, excluded = self.load_specs(source)
        if not specs:
            detail = f" ({len(excluded)} checkpoint(s) without a usable spec)" if excluded else ""
            raise NoSpecsError(f"no specs for encoder {self.encoder.encoder_id} and prompt set {self.prompt_set.name}{detail}; build specs first")
        images = [to_rgb(i) for i in images]
        query_images = self.encoder.encode_images(images)
        if prompt and prompt.strip():
            pseudo, prompt_source = prompt.strip(), "user"
        else:
            pseudo, prompt_source = self.interrogator.prompt_from_features(query_images), "interrogator"
        query_text = self.encoder.encode_texts([pseudo])[0]
        query_pixels = torch.from_numpy(np.stack([pixel_feature(i) for i in images]))
        bank = self._bank(specs)
        ranking = rank(bank, method, query_images, query_text, query_pixels, gamma=gamma, tau=tau)
        ranked = []
        order = ranking.order.tolist()[: top_k or None]
        for position, index in enumerate(order, start=1):
            spec = specs[index]
            matches = [
                PromptMatch(i, spec.prompts[i], float(ranking.weights[i]) if ranking.weights is not None else 0.0, c)
                for i, c in ranking.top_prompts(index)
            ]
            ranked.append(RankedCheckpoint(position, spec.checkpoint_name, spec.sha256, float(ranking.scores[index]), matches))
        return IdentifyResult(method, pseudo, prompt_source, ranking.gamma, ranked, excluded)

    def _bank(self, specs: list[Spec]) -> FeatureBank:
        """The stacked features, reused (with their kernel caches) while the same specs are ranked."""
        key = (self._loaded_versions, tuple((s.sha256, s.checkpoint_name) for s in specs))
        if self._bank_cache is None or self._bank_cache[0] != key:
            self._bank_cache = None
            self._bank_cache = (key, FeatureBank.from_specs(specs))
            _return_freed_memory()
        return self._bank_cache[1]

    # -- for UIs -------------------------------------------------------------------------------
    def spec_thumbnail(self, sha256: str, prompt_index: int) -> Image.Image:
        """Read from the spec file on demand (the ranking keeps no thumbnails in memory)."""
        try:
            pixels = self.store.thumbnail(SpecKey(sha256, self.encoder.encoder_id, self.prompt_set.hash), prompt_index)
        except SpecError as exc:
            raise NoSpecsError(str(exc)) from exc
        if pixels is None:
            raise GmiError(f"spec {sha256[:10]} has no image for prompt {prompt_index}")
        return Image.fromarray(pixels, "RGB")

    def fingerprint(self) -> str:
        return f"{self.encoder.encoder_id}|{self.prompt_set.hash}|{self.store.fingerprint()}"
