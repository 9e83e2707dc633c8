"""The facade every host uses: spec status, building, interrogation and identification."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image

from .budgets import Budget, covered_budget, parse_budget
from .builder import build_spec, missing_images
from .confidence import ranking_confidence
from .encoders import ClipEncoder
from .errors import Busy, Cancelled, CheckpointError, GmiError, NoSpecsError
from .families import FamilySettings
from .images import to_rgb
from .interrogator import Interrogator
from .limits import check_identify, check_settings
from .locks import spec_lock
from .loras import model_metadata, model_of
from .observed import OBSERVED, row_source, spec_counts, spec_kind
from .paths import one_line
from .prompts import PromptSet, load_prompt_set
from .protocols import (
    BuildProgress,
    CheckpointInfo,
    CheckpointListing,
    CheckpointSource,
    GenerationSettings,
    Generator,
    ProgressCallback,
    SkippedCheckpoint,
)
from .query import IdentifyRequest, encode_query
from .ranker import DEFAULT_METHOD, FeatureBank, rank
from .results import BuildPlan, BuildReport, IdentifyResult, PromptMatch, RankedCheckpoint, SpecStatus
from .spec import SpecKey
from .spec_library import Candidates, SpecLibrary
from .store import ManifestEntry, SpecStore

log = logging.getLogger(__name__)


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
        self.prompt_set = prompt_set or load_prompt_set()
        self.budget = parse_budget(budget)
        if isinstance(settings, GenerationSettings):
            settings = FamilySettings.uniform(settings)
        self.settings = settings or FamilySettings.defaults()
        for _, family_settings in self.settings.rows:
            check_settings(family_settings)
        self.base_seed = base_seed
        self.interrogator = Interrogator(encoder, cache_dir=self.store.root / "cache")
        self.library = SpecLibrary(self.store, encoder.encoder_id, self.prompt_set.hash)
        self._prompt_features: torch.Tensor | None = None

    @property
    def prompt_features(self) -> torch.Tensor:
        if self._prompt_features is None:
            self._prompt_features = self.encoder.encode_texts(list(self.prompt_set.prompts))
        return self._prompt_features

    def key(self, checkpoint: CheckpointInfo) -> SpecKey:
        return SpecKey(checkpoint.sha256, self.encoder.encoder_id, self.prompt_set.hash)

    def settings_for(self, checkpoint: CheckpointInfo) -> GenerationSettings:
        return self.settings.for_checkpoint(checkpoint)

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
                self.render_spec(
                    ckpt, generator, self.budget, overall, should_cancel, (index, len(names)), plan.restart
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

    def render_spec(
        self,
        ckpt: CheckpointInfo,
        generator: Generator,
        budget: Budget,
        progress: ProgressCallback | None = None,
        should_cancel: Callable[[], bool] | None = None,
        position: tuple[int, int] = (0, 1),
        restart: bool = False,
    ) -> None:
        """Render one spec up to ``budget`` (only its missing images) under the spec's lock: the one path a build
        and a refine (:mod:`gmi_core.refine`) take."""
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
                budget=budget,
                base_seed=self.base_seed,
                progress=progress,
                should_cancel=should_cancel,
                position=position,
                restart=restart,
            )

    # -- identify ------------------------------------------------------------------------------
    def warm(self) -> None:
        """Compute (or read from the disk cache) what the first identification would: label and prompt
        embeddings. Hosts call it from a background thread after start."""
        self.interrogator.label_embeddings()
        _ = self.prompt_features

    def interrogate(self, images: Sequence[Image.Image]) -> str:
        return self.interrogator.interrogate([to_rgb(i) for i in images])

    def _no_specs_message(self, listed: list[ManifestEntry], excluded: list) -> str:
        """Why identify has nothing to rank: specs of other prompt sets (another ``max_prompts``) said as such."""
        here = f"prompt set {self.prompt_set.name} ({len(self.prompt_set)} prompts, {self.prompt_set.hash[:8]})"
        other = sorted({(e.prompt_set_name, e.prompts_total) for e in listed if e.prompt_set_hash != OBSERVED})
        if other and not any(e.prompt_set_hash == self.prompt_set.hash for e in listed):
            built = ", ".join(f"{name} ({n} prompts)" for name, n in other[:5])
            return f"no specs for {here}; specs exist for {built}: choose that prompt set and size (max_prompts) or build specs first"
        detail = f" ({len(excluded)} checkpoint(s) without a usable spec)" if excluded else ""
        return f"no specs for encoder {self.encoder.encoder_id} and {here}{detail}; build specs first"

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
        among: Collection[str] | None = None,
    ) -> IdentifyResult:
        """Rank the specs for ``images``; ``among``: only these sha256, as a library of their own (kernel width and
        centring from their cells: refine re-ranks the contenders so)."""
        if not images:
            raise GmiError("identify needs at least one reference image")
        top_k, gamma, tau = check_identify(top_k, gamma, tau)
        request = IdentifyRequest(method, top_k, gamma, tau, source, include_not_installed, centre)
        listed = self.library.listed()
        indexed = None if among is not None else self.library.indexed_entries(listed, method, centre)
        if indexed is None:
            only = set(among) if among is not None else None
            loaded = self.library.load(source, include_not_installed, only=only, listed=listed)
            if not loaded.items:
                raise NoSpecsError(self._no_specs_message(listed, loaded.excluded))
        query = encode_query(self.encoder, self.interrogator, images, prompt)
        if indexed is None:  # a subset gets its own bank: the library's cached one stays for the next query
            bank = (
                self.library.bank(loaded) if among is None else FeatureBank.from_specs(loaded.specs, loaded.popularity)
            )
            candidates = Candidates(loaded, bank, gamma)
        else:
            candidates = self.library.index_candidates(indexed, query, request)
        ranking = rank(
            candidates.bank,
            method,
            query.images,
            query.text,
            query.pixels,
            gamma=candidates.gamma,
            tau=tau,
            centre=centre,
        )
        confidence = ranking_confidence(candidates.bank, ranking, query.images, query.text, query.pixels, centre)
        ranked = []
        order = ranking.order.tolist()[: top_k or None]
        for position, index in enumerate(order, start=1):
            item = candidates.loaded.items[index]
            spec = item.spec
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
                    installed=item.installed,
                    kind=spec_kind(spec),
                    counts=spec_counts(spec),
                    aliases=list(item.aliases),
                    prompts_done=sum(c > 0 for c in counts),
                    images_done=sum(counts),
                    partial=missing_images(counts, self.budget) > 0,
                    confidence=confidence.of(index) if confidence else None,
                    model=model_of(item.spec.extra),
                )
            )
        result = IdentifyResult(
            method, query.prompt, query.prompt_source, ranking.gamma, ranked, candidates.loaded.excluded
        )
        if confidence:
            result.ambiguous = confidence.ambiguous
            result.contenders = [candidates.loaded.items[i].spec.checkpoint_name for i in confidence.contenders]
        return result


def _settings_diff(used: GenerationSettings, wanted: GenerationSettings) -> str:
    """``steps 20 (now 30), 512x512 (now 1024x1024)``: what differs, for the UIs."""
    a, b = used.to_dict(), wanted.to_dict()
    parts = [f"{k} {a[k]!r} (now {b[k]!r})" for k in a if a[k] != b[k]]
    return ", ".join(parts)
