"""The facade every host uses: spec status, building, interrogation and identification."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import limits
from .budgets import Budget, covered_budget, parse_budget
from .builder import build_spec, missing_images
from .encoders import ClipEncoder
from .errors import Busy, Cancelled, CheckpointError, GmiError, NoSpecsError, SpecError
from .families import FamilySettings
from .images import to_rgb
from .index import INDEX_CANDIDATES, MAX_RERANKED, StoreIndex, prefetch, updated_index
from .interrogator import Interrogator
from .limits import check_identify, check_settings, json_safe
from .locks import spec_lock
from .loras import model_metadata, model_of
from .observed import OBSERVED, merge, row_source, spec_counts, spec_kind
from .paths import one_line
from .prompts import PromptSet, load_prompt_set
from .protocols import (
    BuildProgress,
    CheckpointInfo,
    CheckpointListing,
    CheckpointSource,
    GenerationSettings,
    Generator,
    ListedCheckpoints,
    ProgressCallback,
    SkippedCheckpoint,
)
from .ranker import DEFAULT_METHOD, FeatureBank, prompt_weights, rank
from .spec import Spec, SpecKey, pixel_feature
from .store import ManifestEntry, SpecStore, safe_name

log = logging.getLogger(__name__)
STATES = ("ready", "partial", "missing", "stale", "corrupt")
INDEXED_METHODS = ("gmi", "rkme_clip")  # the methods the two-tier index prefilters for


def _return_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc). Stacking the bank frees one spec's features at a time,
    and glibc would otherwise keep those pages: the process would hold the features twice."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@dataclass
class SpecStatus:
    """One checkpoint's spec against the engine's budget and settings.

    ``ready``: the budget is built; ``partial``: usable, fewer images than the budget; ``missing``: no spec;
    ``stale``: only a spec of another version of the file or another encoder / prompt set; ``corrupt``.
    ``current`` is False when the spec was built with other generation settings: it stays usable and is
    topped up with its own settings; ``detail`` says so.
    """

    name: str
    sha256: str
    state: str  # one of STATES
    prompts_done: int  # budget prompts with all their images
    prompts_total: int  # prompts in the budget
    detail: str = ""
    family: str = ""
    images_done: int = 0  # images in the spec
    images_budget: int = 0  # images the budget asks for
    images_missing: int = 0  # images "build missing" would render
    prompts_missing: int = 0  # generator calls (one per prompt) that renders them
    budget_done: str | None = None  # the largest named budget the spec covers
    current: bool = True

    observed_images: int = 0  # images in the checkpoint's observed spec (import-images)
    model_kind: str = "checkpoint"  # or "lora": a LoRA on a base checkpoint (gmi_core.loras)
    lora: dict | None = None  # a LoRA row's parts: lora_name, lora_sha256, strength, base_name, base_sha256


@dataclass
class BuildPlan:
    """What a build will render, known before it starts (front ends show it)."""

    budget: str
    checkpoints: list[tuple[str, int]] = field(default_factory=list)  # (name, images to render)
    generate_calls: int = 0  # one per prompt with missing images
    listing: CheckpointListing = field(default_factory=CheckpointListing, repr=False)  # what build() renders from
    restart: bool = False  # "all": render every spec again

    @property
    def images(self) -> int:
        return sum(n for _, n in self.checkpoints)

    def to_dict(self) -> dict:
        return {
            "budget": self.budget,
            "images": self.images,
            "generate_calls": self.generate_calls,
            "checkpoints": [{"name": n, "images": k} for n, k in self.checkpoints],
        }


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
    prompts_done: int = 0  # prompts with images in the spec
    images_done: int = 0
    partial: bool = False  # the spec holds less than the engine's budget
    model: dict = field(default_factory=lambda: {"kind": "checkpoint"})  # gmi_core.loras.model_of: kind and parts

    @property
    def model_kind(self) -> str:
        return self.model["kind"]

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
        return json_safe(
            {
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
                        "prompts_done": r.prompts_done,
                        "images_done": r.images_done,
                        "partial": r.partial,
                        "model_kind": r.model_kind,
                        "lora": r.model if r.model_kind == "lora" else None,
                    }
                    for r in self.ranking
                ],
                "excluded": [{"name": n, "reason": r} for n, r in self.excluded],
            }
        )


class Gmi:
    """One encoder, prompt set, budget and settings over a spec store (hosts keep several: gmi_core.service.EnginePool)."""

    def __init__(
        self,
        spec_root: Path,
        encoder: ClipEncoder,
        prompt_set: PromptSet | None = None,
        budget: Budget | str | None = None,
        settings: FamilySettings | GenerationSettings | None = None,
        base_seed: int = 0,
    ):
        """``settings``: per family (default: :mod:`gmi_core.families`), or one GenerationSettings for all."""
        self.store = SpecStore(spec_root)
        self.encoder = encoder
        self.prompt_set = prompt_set or load_prompt_set("platform")
        self.budget = parse_budget(budget)
        if isinstance(settings, GenerationSettings):
            settings = FamilySettings.uniform(settings)
        self.settings = settings or FamilySettings.defaults()
        for _, family_settings in self.settings.rows:
            check_settings(family_settings)
        self.base_seed = base_seed
        self.interrogator = Interrogator(encoder, cache_dir=self.store.root / "cache")
        self._prompt_features: torch.Tensor | None = None
        self._bank_cache: tuple[tuple, FeatureBank] | None = None
        self._spec_cache: dict[str, tuple[float, Spec | None]] = {}
        self._merged_cache: dict[str, tuple] = {}
        self._loaded_versions: tuple = ()  # (file, mtime) of the specs the last load_specs listed
        self._index: StoreIndex | None = None

    @property
    def prompt_features(self) -> torch.Tensor:
        if self._prompt_features is None:
            self._prompt_features = self.encoder.encode_texts(list(self.prompt_set.prompts))
        return self._prompt_features

    def key(self, checkpoint: CheckpointInfo) -> SpecKey:
        return SpecKey(checkpoint.sha256, self.encoder.encoder_id, self.prompt_set.hash)

    def settings_for(self, checkpoint: CheckpointInfo) -> GenerationSettings:
        return self.settings.for_family(checkpoint.family)

    # -- status --------------------------------------------------------------------------------
    def status(self, source: CheckpointSource) -> tuple[list[SpecStatus], list[SkippedCheckpoint]]:
        return self._status(source.list_checkpoints())

    def _status(self, listing: CheckpointListing) -> tuple[list[SpecStatus], list[SkippedCheckpoint]]:
        entries, problems = self.store.scan()
        by_key = {e.key: e for e in entries}
        n = len(self.prompt_set)
        budget_prompts = self.budget.prompt_indices(n)
        need = self.budget.images_per_prompt
        observed = {
            e.sha256: e.prompts_done
            for e in entries
            if e.prompt_set_hash == OBSERVED and e.encoder_id == self.encoder.encoder_id
        }
        statuses = []
        for ckpt in listing.checkpoints:
            base = dict(
                prompts_total=len(budget_prompts),
                family=ckpt.family or "",
                images_budget=self.budget.images(n),
                images_missing=self.budget.images(n),
                prompts_missing=len(budget_prompts),
                model_kind=ckpt.kind,
                lora=model_metadata(ckpt) if ckpt.lora else None,
            )
            entry = by_key.get(self.key(ckpt))
            if entry is None:
                state, detail = "missing", ""
                path = self.store.path_for(self.key(ckpt))
                observed_images = observed.get(ckpt.sha256, 0)
                if path.exists():  # a file identify would refuse: corrupt, rebuilt by "build missing"
                    state = "corrupt"
                    detail = problems.get(str(path.relative_to(self.store.root)), "unreadable spec file")
                else:
                    detail = self._why_stale(ckpt, entries)
                    state = "stale" if detail else "missing"
                statuses.append(
                    SpecStatus(ckpt.name, ckpt.sha256, state, 0, detail=detail, observed_images=observed_images, **base)
                )
                continue
            counts = entry.image_counts
            base["images_missing"] = missing_images(counts, self.budget)
            base["prompts_missing"] = sum(counts[i] < need for i in budget_prompts)
            wanted = self.settings_for(ckpt)
            used = GenerationSettings.from_dict(entry.settings)
            current = used == wanted
            detail = "" if current else f"built with other settings ({_settings_diff(used, wanted)}); usable, kept"
            statuses.append(
                SpecStatus(
                    ckpt.name,
                    ckpt.sha256,
                    "partial" if base["images_missing"] else "ready",
                    sum(counts[i] >= need for i in budget_prompts),
                    detail=detail,
                    images_done=sum(counts),
                    budget_done=covered_budget(counts, n),
                    current=current,
                    observed_images=observed.get(ckpt.sha256, 0),
                    **base,
                )
            )
        return statuses, listing.skipped

    def _why_stale(self, ckpt: CheckpointInfo, entries: list[ManifestEntry]) -> str:
        """Why only an unusable spec exists for ``ckpt`` (empty: none exists; observed specs are never stale)."""
        entries = [e for e in entries if e.prompt_set_hash != OBSERVED]
        for e in entries:
            if e.sha256 == ckpt.sha256 and e.encoder_id != self.encoder.encoder_id:
                return f"spec built for encoder {e.encoder_id}"
            if e.sha256 == ckpt.sha256:
                return f"spec built for prompt set {e.prompt_set_name} ({e.prompt_set_hash})"
        for e in entries:
            if (
                e.checkpoint_name == ckpt.name
                and e.encoder_id == self.encoder.encoder_id
                and e.prompt_set_hash == self.prompt_set.hash
            ):
                return f"checkpoint file changed since its spec was built (was {e.sha256[:10]})"
        return ""

    # -- build planning ------------------------------------------------------------------------
    def plan(self, source: CheckpointSource, which: str | Sequence[str] = "missing") -> BuildPlan:
        """How many images a build of ``which`` renders, per checkpoint, before it starts. Pass it to
        :meth:`build`, which renders exactly this plan: the checkpoints are listed and hashed once per build."""
        listing = source.list_checkpoints()
        statuses, skipped = self._status(listing)
        plan = self._plan(statuses, which, skipped)
        plan.listing, plan.restart = listing, which == "all"
        return plan

    def _plan(self, statuses: list[SpecStatus], which, skipped: Sequence[SkippedCheckpoint] = ()) -> BuildPlan:
        """Names that gmi skipped (not a checkpoint it can use) are left out here and reported by the caller;
        several names of one file (same sha256) are built once, under the first name."""
        if isinstance(which, str) and which not in ("missing", "all"):
            which = [which]
        if which == "all":
            picked = statuses
        elif which == "missing":
            picked = [s for s in statuses if s.state != "ready"]
        else:
            known = {s.name: s for s in statuses}
            skipped_names = {s.name for s in skipped}
            unknown = [n for n in which if n not in known and n not in skipped_names]
            if unknown:
                raise CheckpointError(f"unknown checkpoint(s): {', '.join(unknown)}")
            picked = [known[n] for n in dict.fromkeys(which) if n in known]
        seen: set[str] = set()
        picked = [s for s in picked if not (s.sha256 in seen or seen.add(s.sha256))]
        if which == "all":
            chosen = [(s, s.images_budget, s.prompts_total) for s in picked]
        else:
            chosen = [(s, s.images_missing, s.prompts_missing) for s in picked]
        rows = [(s.name, images) for s, images, _ in chosen]
        return BuildPlan(self.budget.label(len(self.prompt_set)), rows, sum(calls for _, _, calls in chosen))

    # -- build ---------------------------------------------------------------------------------
    def build(
        self,
        source: CheckpointSource,
        generator: Generator,
        which: str | Sequence[str] = "missing",
        progress: ProgressCallback | None = None,
        should_cancel: Callable[[], bool] | None = None,
        plan: BuildPlan | None = None,
    ) -> BuildReport:
        """Build specs up to the budget: ``which`` is "missing" (not ready: adds only the images a spec lacks),
        "all" (renders every spec again with the current settings), or a list of checkpoint names (top up).
        ``plan``: the :meth:`plan` a front end already showed (then ``source`` and ``which`` are not used again).
        Checkpoints with nothing to render are reported built and left out of the progress counts."""
        plan = plan or self.plan(source, which)
        report = BuildReport(skipped=list(plan.listing.skipped))
        listing = {c.name: c for c in plan.listing.checkpoints}
        report.built += [name for name, images in plan.checkpoints if not images]
        names = [name for name, images in plan.checkpoints if images]
        started, rendered = time.perf_counter(), {}

        def overall(p: BuildProgress) -> None:
            rendered[p.checkpoint] = p.images_rendered
            total = sum(rendered.values())
            per_image = (time.perf_counter() - started) / total if total else None
            if progress:
                progress(
                    replace(
                        p,
                        images_planned=plan.images,
                        images_rendered=total,
                        seconds_per_image=per_image,
                        eta_s=per_image * max(0, plan.images - total) if per_image else None,
                    )
                )

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
                        settings=self.settings_for(ckpt),
                        budget=self.budget,
                        base_seed=self.base_seed,
                        progress=overall,
                        should_cancel=should_cancel,
                        position=(index, len(names)),
                        restart=plan.restart,
                    )
                report.built.append(name)
            except Busy as exc:
                report.skipped.append(SkippedCheckpoint(name, ckpt.path, str(exc)))
            except Cancelled:
                report.cancelled = True
                break
            except (GmiError, RuntimeError, ValueError, OSError) as exc:
                log.warning("gmi: building the spec of %s failed: %s", name, exc)
                report.failed.append(
                    (name, one_line(exc) if isinstance(exc, OSError) else f"{type(exc).__name__}: {one_line(exc)}")
                )
            finally:
                following = listing[names[index + 1]] if index + 1 < len(names) else None
                if following is None or report.cancelled or following.base_sha256 != ckpt.base_sha256:
                    generator.release()  # LoRAs on one base render without reloading it
        return report

    # -- identify ------------------------------------------------------------------------------
    def warm(self) -> None:
        """Compute (or read from the disk cache) what the first identification would: label and prompt
        embeddings. Hosts call it from a background thread after start."""
        self.interrogator.label_embeddings()
        _ = self.prompt_features

    def interrogate(self, images: Sequence[Image.Image]) -> str:
        return self.interrogator.interrogate([to_rgb(i) for i in images])

    def load_specs(
        self,
        source: CheckpointSource | None = None,
        include_not_installed: bool = False,
        only: set[str] | None = None,
        listed: list[ManifestEntry] | None = None,
    ) -> tuple[list[Spec], list[tuple[str, str]]]:
        """Usable specs for this encoder and prompt set, and (name, reason) for those left out.

        A checkpoint's generated spec and its observed spec (:mod:`gmi_core.observed`) become one.
        Specs of checkpoints the source does not list (imported ones) are left out unless
        ``include_not_installed``; they then carry ``extra["installed"] = False``. ``only``: just these sha256
        (the index's candidates), read from their files and not kept in memory. ``listed``: this encoder's store
        entries when the caller has listed the store already.
        """
        wanted, aliases, excluded = self._installed(source)
        if listed is None:
            listed = [e for e in self.store.entries() if e.encoder_id == self.encoder.encoder_id]
        entries = [e for e in listed if e.prompt_set_hash in (self.prompt_set.hash, OBSERVED)]
        self._loaded_versions = tuple((e.file, e.mtime) for e in entries)  # the bank's key: no second store listing
        found = {e.sha256 for e in entries}
        if wanted is not None:
            excluded += [(c.name, self._why_unusable(c)) for sha, c in wanted.items() if sha not in found]
            foreign = {e.sha256 for e in entries if e.sha256 not in wanted}
            if foreign and not include_not_installed:
                excluded.append(
                    (
                        f"{len(foreign)} checkpoint(s) not installed",
                        "imported specs; include them with the not-installed option",
                    )
                )
                entries = [e for e in entries if e.sha256 in wanted]
        if only is not None:
            entries = [e for e in entries if e.sha256 in only]
        parts = self._read_parts(entries, keep=only is None, excluded=excluded)
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

    @staticmethod
    def _installed(source: CheckpointSource | None) -> tuple[dict | None, dict[str, list[str]], list[tuple[str, str]]]:
        """({sha256: checkpoint} the source lists (None: no source), {sha256: other names of the same file},
        [(name, reason)] for the files it skipped)."""
        if source is None:
            return None, {}, []
        listing = source.list_checkpoints()
        wanted, aliases = {}, {}
        for c in listing.checkpoints:  # one file, several names: ranked once, the others listed as aliases
            if c.sha256 in wanted:
                aliases.setdefault(c.sha256, []).append(c.name)
            else:
                wanted[c.sha256] = c
        return wanted, aliases, [(s.name, s.reason) for s in listing.skipped]

    def _read_parts(self, entries: list[ManifestEntry], keep: bool, excluded: list) -> dict[str, dict[str, Spec]]:
        """{sha256: {"generated" | OBSERVED: spec}} of the usable entries (kept in memory when ``keep``); the others
        are added to ``excluded`` with their reason."""
        parts: dict[str, dict[str, Spec]] = {}
        for entry in entries:
            try:
                spec = self._load_cached(entry) if keep else self._load_listed(entry)
            except SpecError as exc:
                excluded.append((entry.checkpoint_name, str(exc)))
                continue
            if spec is None or not spec.done.any():
                excluded.append((entry.checkpoint_name, "spec has no finished prompt"))
                continue
            parts.setdefault(entry.sha256, {})[OBSERVED if entry.prompt_set_hash == OBSERVED else "generated"] = spec
        return parts

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
        """A spec's features, read once per process and file version. The store lists only file versions it has
        verified (:meth:`SpecStore.scan`), so the file is checked again only if it changed since it was listed."""
        cached = self._spec_cache.get(entry.file)
        if cached is not None and cached[0] == entry.mtime:
            return cached[1]
        spec = self._load_listed(entry)
        self._spec_cache[entry.file] = (entry.mtime, spec)
        return spec

    def _load_listed(self, entry: ManifestEntry) -> Spec | None:
        try:
            st = (self.store.root / entry.file).stat()
            listed = (st.st_mtime, st.st_size) == (entry.mtime, entry.size)
        except OSError:
            listed = False
        return self.store.load(entry.key, verify=not listed, thumbnails=False)

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
        listed = [e for e in self.store.entries() if e.encoder_id == self.encoder.encoder_id]
        indexed = self._indexed_entries(listed, method, centre)
        if indexed is None:
            specs, excluded = self.load_specs(source, include_not_installed, listed=listed)
            if not specs:
                detail = f" ({len(excluded)} checkpoint(s) without a usable spec)" if excluded else ""
                raise NoSpecsError(
                    f"no specs for encoder {self.encoder.encoder_id} and prompt set {self.prompt_set.name}{detail}; build specs first"
                )
        images = [to_rgb(i) for i in images]
        query_images = self.encoder.encode_images(images)
        if prompt and prompt.strip():
            pseudo, prompt_source = prompt.strip(), "user"
        else:
            pseudo, prompt_source = self.interrogator.prompt_from_features(query_images), "interrogator"
        query_text = self.encoder.encode_texts([pseudo])[0]
        query_pixels = torch.from_numpy(np.stack([pixel_feature(i) for i in images]))
        if indexed is None:
            bank = self._bank(specs)
        else:
            specs, excluded, bank, gamma = self._index_candidates(
                indexed, query_images, query_text, method, gamma, tau, top_k, source, include_not_installed
            )
        ranking = rank(bank, method, query_images, query_text, query_pixels, gamma=gamma, tau=tau, centre=centre)
        ranked = []
        order = ranking.order.tolist()[: top_k or None]
        for position, index in enumerate(order, start=1):
            spec = specs[index]
            matches = [
                PromptMatch(i, spec.prompts[i], ranking.weight(index, i), c, *row_source(spec, i))
                for i, c in ranking.top_prompts(index)
            ]
            counts = spec.image_counts
            ranked.append(
                RankedCheckpoint(
                    position,
                    spec.checkpoint_name,
                    spec.sha256,
                    float(ranking.scores[index]),
                    matches,
                    installed=spec.extra.get("installed", True),
                    kind=spec_kind(spec),
                    counts=spec_counts(spec),
                    aliases=list(spec.extra.get("aliases", [])),
                    prompts_done=sum(c > 0 for c in counts),
                    images_done=sum(counts),
                    partial=missing_images(counts, self.budget) > 0,
                    model=model_of(spec.extra),
                )
            )
        return IdentifyResult(method, pseudo, prompt_source, ranking.gamma, ranked, excluded)

    # -- the two-tier index (model-hub scale) -------------------------------------------------
    def _indexed_entries(self, listed: list[ManifestEntry], method: str, centre: bool) -> list[ManifestEntry] | None:
        """``listed`` (this encoder's specs) when identify prefilters the complete generated ones with the index (at
        least ``limits.INDEX_MIN_SPECS`` of them), else None (every spec is ranked exactly)."""
        if method not in INDEXED_METHODS or centre:
            return None
        complete = sum(e.prompt_set_hash == self.prompt_set.hash and e.complete for e in listed)
        return listed if complete >= limits.INDEX_MIN_SPECS else None

    def index_path(self) -> Path:
        return (
            self.store.root
            / "index"
            / f"{safe_name(self.encoder.encoder_id)}--{safe_name(self.prompt_set.hash)}.safetensors"
        )

    def store_index(self, entries: list[ManifestEntry]) -> StoreIndex:
        """The index of ``entries``: held in memory, else the saved one; brought up to date with the store listing
        (and saved) when specs were added, rewritten or removed since it was built."""
        current = self._index or StoreIndex.load(self.index_path())
        index = updated_index(self.store, entries, current)
        if index is not current:
            try:
                index.save(self.index_path())
            except OSError as exc:
                log.warning("gmi: spec index not saved (%s); it is built again by the next process", exc)
        self._index = index
        return index

    def _index_candidates(
        self, listed, query_images, query_text, method, gamma, tau, top_k, source, include_not_installed
    ):
        """(specs, excluded, bank, gamma) of the index's shortlist plus every spec it does not cover (partial and
        observed ones), read from their files; the exact ranker then orders just these."""
        index = self.store_index([e for e in listed if e.prompt_set_hash == self.prompt_set.hash and e.complete])
        n = index.prompt.shape[0]
        weights = prompt_weights(index.prompt, query_text, tau) if method == "gmi" else torch.full((n,), 1.0 / n)
        allowed = None
        if source is not None:
            source = ListedCheckpoints(source.list_checkpoints())  # also what load_specs reads below
            if not include_not_installed:
                installed = {c.sha256 for c in source.listing.checkpoints}
                allowed = torch.tensor([sha in installed for sha in index.shas])
        shortlist = set(
            index.shortlist(query_images, weights, min(max(INDEX_CANDIDATES, top_k or 0), MAX_RERANKED), allowed)
        )
        covered = set(index.shas)
        shortlist |= {
            e.sha256
            for e in listed
            if e.prompt_set_hash == OBSERVED or (e.prompt_set_hash == self.prompt_set.hash and e.sha256 not in covered)
        }
        for entry in listed:
            if entry.sha256 in shortlist:
                prefetch(self.store.root / entry.file)
        specs, excluded = self.load_specs(source, include_not_installed, only=shortlist, listed=listed)
        if not specs:
            raise NoSpecsError(f"no installed checkpoint among the {len(index.shas)} indexed specs; build specs first")
        others = int(allowed.sum()) if allowed is not None else len(index.shas)
        others -= len(covered & {s.sha256 for s in specs})
        if others > 0:
            excluded.append(
                (f"{others} other checkpoint(s)", "not among the two-tier index's candidates for this image")
            )
        bank = FeatureBank.from_specs(specs)
        if gamma is None:
            gamma = index.compact.gamma
            rows = {sha: i for i, sha in enumerate(index.shas)}
            if all(
                s.sha256 in rows
                and spec_kind(s) == "generated"
                and s.complete
                and s.images_per_prompt == bank.image.shape[2] > 1
                for s in specs
            ):  # Kbar of complete specs with >= 2 images depends on the spec alone: reuse the index's
                bank._kbar_cache[(False, False, False, round(gamma, 9))] = index.compact.kbar[
                    [rows[s.sha256] for s in specs]
                ]
        return specs, excluded, bank, gamma

    def _bank(self, specs: list[Spec]) -> FeatureBank:
        """The stacked features, reused (with their kernel caches) while the same specs are ranked."""
        key = (self._loaded_versions, tuple((s.sha256, s.checkpoint_name) for s in specs))
        if self._bank_cache is None or self._bank_cache[0] != key:
            self._bank_cache = None
            self._bank_cache = (key, FeatureBank.from_specs(specs))
            _return_freed_memory()
        return self._bank_cache[1]

    # -- for UIs -------------------------------------------------------------------------------
    def spec_thumbnail(self, sha256: str, prompt_index: int, prompt_set_hash: str | None = None) -> Image.Image:
        """Row ``prompt_index`` of the stored spec ``prompt_set_hash`` (default: this engine's prompt set), read from
        the spec file on demand (the ranking keeps no thumbnails in memory)."""
        if prompt_set_hash not in (None, self.prompt_set.hash, OBSERVED):
            raise GmiError(f"no spec of prompt set {prompt_set_hash!r} here")
        try:
            pixels = self.store.thumbnail(
                SpecKey(sha256, self.encoder.encoder_id, prompt_set_hash or self.prompt_set.hash), prompt_index
            )
        except SpecError as exc:
            raise NoSpecsError(str(exc)) from exc
        if pixels is None:
            raise GmiError(f"spec {sha256[:10]} has no image for prompt {prompt_index}")
        return Image.fromarray(pixels, "RGB")


def _settings_diff(used: GenerationSettings, wanted: GenerationSettings) -> str:
    """``steps 20 (now 30), 512x512 (now 1024x1024)``: what differs, for the UIs."""
    a, b = used.to_dict(), wanted.to_dict()
    parts = [f"{k} {a[k]!r} (now {b[k]!r})" for k in a if a[k] != b[k]]
    return ", ".join(parts)
