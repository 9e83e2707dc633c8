"""The facade every host uses: spec status, building, interrogation and identification."""

from __future__ import annotations

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
from .errors import Busy, Cancelled, CheckpointError, GmiError, NoSpecsError, SpecError
from .images import to_rgb
from .interrogator import Interrogator
from .limits import check_identify, check_images_per_prompt, check_settings, json_safe
from .locks import spec_lock
from .observed import OBSERVED, merge, row_source, spec_counts, spec_kind
from .paths import one_line
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
from .store import ManifestEntry, SpecStore

log = logging.getLogger(__name__)
STATES = ("ready", "partial", "missing", "stale", "corrupt")


@dataclass
class SpecStatus:
    name: str
    sha256: str
    state: str  # one of STATES
    prompts_done: int
    prompts_total: int
    detail: str = ""
    observed_images: int = 0  # images in the checkpoint's observed spec (import-images)


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
    prompt_set_hash: str = ""  # the stored spec this row comes from ("observed" for the user's own images)
    spec_index: int = -1  # the row in that stored spec


@dataclass
class RankedCheckpoint:
    rank: int
    name: str
    sha256: str
    score: float
    top_prompts: list[PromptMatch]
    installed: bool = True  # False: an imported spec of a checkpoint that is not on this machine
    kind: str = "generated"  # generated / observed / mixed
    counts: dict = field(default_factory=dict)
    aliases: list[str] = field(default_factory=list)  # other file names with the same sha256

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
        return json_safe({
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
                    "installed": r.installed,
                    "kind": r.kind,
                    "counts": r.counts,
                    "aliases": list(r.aliases),
                }
                for r in self.ranking
            ],
            "excluded": [{"name": n, "reason": r} for n, r in self.excluded],
        })


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
        self.images_per_prompt = check_images_per_prompt(images_per_prompt)
        self.settings = check_settings(settings or GenerationSettings())
        self.base_seed = base_seed
        self.interrogator = Interrogator(encoder, cache_dir=self.store.root / "cache")
        self._prompt_features: torch.Tensor | None = None
        self._bank_cache: tuple[tuple, FeatureBank] | None = None
        self._spec_cache: dict[str, tuple[float, Spec | None]] = {}
        self._merged_cache: dict[str, tuple] = {}

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
        entries, problems = self.store.scan()
        by_key = {e.key: e for e in entries}
        observed = {e.sha256: e.prompts_done for e in entries if e.prompt_set_hash == OBSERVED and e.encoder_id == self.encoder.encoder_id}
        statuses = []
        for ckpt in listing.checkpoints:
            total = len(self.prompt_set)
            entry = by_key.get(self.key(ckpt))
            if entry is None:
                path = self.store.path_for(self.key(ckpt))
                observed_images = observed.get(ckpt.sha256, 0)
                if path.exists():  # a file identify would refuse: corrupt, rebuilt by "build missing"
                    reason = problems.get(str(path.relative_to(self.store.root)), "unreadable spec file")
                    statuses.append(SpecStatus(ckpt.name, ckpt.sha256, "corrupt", 0, total, reason, observed_images))
                else:
                    statuses.append(SpecStatus(ckpt.name, ckpt.sha256, "missing", 0, total, observed_images=observed_images))
                continue
            fresh = entry.images_per_prompt == self.images_per_prompt and GenerationSettings.from_dict(
                entry.settings
            ) == self.settings and entry.prompts_total == total
            if not fresh:
                state, detail = "stale", "built with other settings"
            else:
                state, detail = ("ready" if entry.complete else "partial"), ""
            statuses.append(SpecStatus(ckpt.name, ckpt.sha256, state, entry.prompts_done, total, detail,
                                       observed.get(ckpt.sha256, 0)))
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
            skipped_by_name = {s.name: s for s in skipped}
            unknown = [n for n in which if n not in listing and n not in skipped_by_name]
            if unknown:
                raise CheckpointError(f"unknown checkpoint(s): {', '.join(unknown)}")
            names = [n for n in dict.fromkeys(which) if n in listing]
        names = self._one_name_per_file(names, listing)
        for index, name in enumerate(names):
            ckpt = listing[name]
            try:
                with spec_lock(self.store.path_for(self.key(ckpt))):
                    self.store.remove_temp_files(self.key(ckpt))
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
            except Busy as exc:
                report.skipped.append(SkippedCheckpoint(name, ckpt.path, str(exc)))
            except Cancelled:
                report.cancelled = True
                break
            except (GmiError, RuntimeError, ValueError, OSError) as exc:
                log.warning("gmi: building the spec of %s failed: %s", name, exc)
                report.failed.append((name, one_line(exc) if isinstance(exc, OSError) else f"{type(exc).__name__}: {one_line(exc)}"))
            finally:
                generator.release()
        return report

    @staticmethod
    def _one_name_per_file(names: list[str], listing: dict[str, CheckpointInfo]) -> list[str]:
        """Several names for one file (same sha256) are built once, under the first name."""
        seen, out = set(), []
        for name in names:
            if listing[name].sha256 not in seen:
                seen.add(listing[name].sha256)
                out.append(name)
        return out

    # -- identify ------------------------------------------------------------------------------
    def interrogate(self, images: Sequence[Image.Image]) -> str:
        return self.interrogator.interrogate([to_rgb(i) for i in images])

    def load_specs(
        self, source: CheckpointSource | None = None, include_not_installed: bool = False
    ) -> tuple[list[Spec], list[tuple[str, str]]]:
        """Usable specs for this encoder and prompt set, and (name, reason) for those left out.

        A checkpoint's generated spec and its observed spec (:mod:`gmi_core.observed`) become one.
        Specs of checkpoints the source does not list (imported ones) are left out unless
        ``include_not_installed``; they then carry ``extra["installed"] = False``.
        """
        excluded: list[tuple[str, str]] = []
        aliases: dict[str, list[str]] = {}
        if source is not None:
            listing = source.list_checkpoints()
            wanted = {}
            for c in listing.checkpoints:  # one file, several names: ranked once, the others listed as aliases
                if c.sha256 in wanted:
                    aliases.setdefault(c.sha256, []).append(c.name)
                else:
                    wanted[c.sha256] = c
            excluded += [(s.name, s.reason) for s in listing.skipped]
        else:
            wanted = None
        entries = [e for e in self.store.entries() if e.encoder_id == self.encoder.encoder_id]
        entries = [e for e in entries if e.prompt_set_hash in (self.prompt_set.hash, OBSERVED)]
        found = {e.sha256 for e in entries}
        if wanted is not None:
            excluded += [(c.name, self._why_unusable(c)) for sha, c in wanted.items() if sha not in found]
            foreign = {e.sha256 for e in entries if e.sha256 not in wanted}
            if foreign and not include_not_installed:
                excluded.append((f"{len(foreign)} checkpoint(s) not installed", "imported specs; include them with the not-installed option"))
                entries = [e for e in entries if e.sha256 in wanted]
        parts: dict[str, dict[str, Spec]] = {}
        for entry in entries:
            try:
                spec = self._load_cached(entry)
            except SpecError as exc:
                excluded.append((entry.checkpoint_name, str(exc)))
                continue
            if spec is None or not spec.done.any():
                excluded.append((entry.checkpoint_name, "spec has no finished prompt"))
                continue
            parts.setdefault(entry.sha256, {})[OBSERVED if entry.prompt_set_hash == OBSERVED else "generated"] = spec
        generated = [p["generated"] for p in parts.values() if "generated" in p]
        if generated:  # one ranking needs one shape: keep the most common images-per-prompt
            counts = Counter(s.images_per_prompt for s in generated)
            common = max(counts, key=lambda n: (counts[n], n == self.images_per_prompt))
            for spec in generated:
                if spec.images_per_prompt != common:
                    excluded.append((spec.checkpoint_name, f"spec has {spec.images_per_prompt} images per prompt, others {common}"))
                    del parts[spec.sha256]["generated"]
        specs = []
        for sha, pair in parts.items():
            if not pair:
                continue
            spec = self._merged(pair.get("generated"), pair.get(OBSERVED))
            installed = wanted is None or sha in wanted
            if wanted is not None and installed:
                spec.checkpoint_name = wanted[sha].name
                spec.extra["popularity"] = wanted[sha].popularity
                spec.extra["aliases"] = aliases.get(sha, [])
            spec.extra["installed"] = installed
            specs.append(spec)
        return specs, excluded

    def _merged(self, generated: Spec | None, observed: Spec | None) -> Spec:
        """merge(), cached while both parts are the same loaded objects (merging copies features)."""
        key = (id(generated), id(observed))
        sha = (generated or observed).sha256
        cached = self._merged_cache.get(sha)
        if cached is None or cached[0] != key:
            cached = (key, merge(generated, observed), (generated, observed))
            self._merged_cache[sha] = cached
        return cached[1]

    def _load_cached(self, entry: ManifestEntry) -> Spec | None:
        """A spec read (and checksummed) once per file version, not on every identification."""
        cached = self._spec_cache.get(entry.file)
        if cached is not None and cached[0] == entry.mtime:
            return cached[1]
        spec = self.store.load(entry.key)
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
        include_not_installed: bool = False,
        centre: bool = False,
    ) -> IdentifyResult:
        if not images:
            raise GmiError("identify needs at least one reference image")
        top_k, gamma, tau = check_identify(top_k, gamma, tau)
        specs, excluded = self.load_specs(source, include_not_installed)
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
        ranking = rank(bank, method, query_images, query_text, query_pixels, gamma=gamma, tau=tau, centre=centre)
        ranked = []
        order = ranking.order.tolist()[: top_k or None]
        for position, index in enumerate(order, start=1):
            spec = specs[index]
            matches = [
                PromptMatch(i, spec.prompts[i], ranking.weight(index, i), c, *row_source(spec, i))
                for i, c in ranking.top_prompts(index)
            ]
            ranked.append(RankedCheckpoint(position, spec.checkpoint_name, spec.sha256, float(ranking.scores[index]), matches,
                                           spec.extra.get("installed", True), spec_kind(spec), spec_counts(spec),
                                           list(spec.extra.get("aliases", []))))
        return IdentifyResult(method, pseudo, prompt_source, ranking.gamma, ranked, excluded)

    def _bank(self, specs: list[Spec]) -> FeatureBank:
        """The stacked features, reused (with their kernel caches) while the same specs are ranked."""
        key = (self.store.fingerprint(), tuple((s.sha256, s.checkpoint_name) for s in specs))
        if self._bank_cache is None or self._bank_cache[0] != key:
            self._bank_cache = (key, FeatureBank.from_specs(specs))
        return self._bank_cache[1]

    # -- for UIs -------------------------------------------------------------------------------
    def spec_thumbnail(self, sha256: str, prompt_index: int, prompt_set_hash: str | None = None) -> Image.Image:
        """Row ``prompt_index`` of the stored spec ``prompt_set_hash`` (default: this engine's prompt set)."""
        if prompt_set_hash not in (None, self.prompt_set.hash, OBSERVED):
            raise GmiError(f"no spec of prompt set {prompt_set_hash!r} here")
        spec = self.store.load(SpecKey(sha256, self.encoder.encoder_id, prompt_set_hash or self.prompt_set.hash))
        if spec is None:
            raise NoSpecsError(f"no spec for {sha256[:10]}")
        if not 0 <= prompt_index < spec.n_prompts or not spec.done[prompt_index]:
            raise GmiError(f"spec {sha256[:10]} has no image for prompt {prompt_index}")
        return Image.fromarray(spec.thumbnails[prompt_index].numpy(), "RGB")

    def fingerprint(self) -> str:
        return f"{self.encoder.encoder_id}|{self.prompt_set.hash}|{self.store.fingerprint()}"
