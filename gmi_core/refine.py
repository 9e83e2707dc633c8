"""Refine: when a ranking is ambiguous, render the contenders' missing images and rank again.

Identify first (at whatever the specs hold); if the confidence (:mod:`gmi_core.confidence`) names contenders, top
up just their specs towards a larger budget (default full) through the prefix budgets of :mod:`gmi_core.budgets`:
the builder renders only cells a spec lacks, saves after every prompt, and the grown specs stay for later queries.
An image cap is shared evenly by the contenders (each gets the largest prefix of the target budget that fits its
share). The contenders are then ranked among themselves, ahead of the rows already set apart from them
(:func:`contenders_first`). An interrupt keeps every saved prompt, and refine still answers with the ranking over
what it has. Both hosts and the CLI call :func:`refine`; docs/confidence.md describes it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from PIL import Image

from .budgets import Budget, parse_budget
from .builder import missing_images
from .engine import Gmi
from .errors import Busy, Cancelled, GmiError
from .limits import REFINE_MAX_CONTENDERS
from .paths import one_line
from .protocols import BuildProgress, CheckpointSource, Generator, ProgressCallback
from .results import IdentifyResult

log = logging.getLogger(__name__)
REFINE_BUDGET = "full"  # what refine tops the contenders' specs up to unless told otherwise
REFINE_MODES = ("off", "contenders")  # the node's and the tab's choice


@dataclass
class RefineResult:
    """The ranking before and after refining, and what was rendered for it."""

    before: IdentifyResult
    after: IdentifyResult
    budget: str
    planned: list[tuple[str, int]] = field(default_factory=list)  # (checkpoint, images to render)
    rendered: dict[str, int] = field(default_factory=dict)  # checkpoint -> images rendered
    cancelled: bool = False
    failed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def images_rendered(self) -> int:
        return sum(self.rendered.values())

    def summary(self) -> dict:
        """What the UIs show beside the refined ranking: the ranking before, what was rendered."""
        return {
            "budget": self.budget,
            "images_planned": sum(n for _, n in self.planned),
            "images_rendered": self.images_rendered,
            "checkpoints": [
                {"name": n, "images_planned": k, "images_rendered": self.rendered.get(n, 0)} for n, k in self.planned
            ],
            "cancelled": self.cancelled,
            "failed": [{"name": n, "reason": r} for n, r in self.failed],
            "before": {
                "ambiguous": self.before.ambiguous,
                "contenders": list(self.before.contenders),
                "ranking": [
                    {
                        "rank": r.rank,
                        "name": r.name,
                        "score": r.score,
                        "confidence": r.confidence,
                        "images_done": r.images_done,
                    }
                    for r in self.before.ranking
                ],
            },
        }

    def to_dict(self) -> dict:
        return {**self.after.to_dict(), "refine": self.summary()}


def refined_contenders(result: IdentifyResult) -> list[str]:
    """The contenders a refine tops up and then ranks among themselves: the best-ranked REFINE_MAX_CONTENDERS."""
    return result.contenders[:REFINE_MAX_CONTENDERS] if result.ambiguous else []


def refine_plan(
    engine: Gmi, result: IdentifyResult, source: CheckpointSource, budget: Budget, max_images: int | None = None
) -> list[tuple[object, Budget, int]]:
    """(checkpoint, budget to build it to, images that renders) for the installed generated ones of
    :func:`refined_contenders`, within ``max_images`` in all; empty when the ranking is not ambiguous."""
    if not result.ambiguous:
        return []
    listed = {c.sha256: c for c in source.list_checkpoints().checkpoints}
    rows = {r.name: r for r in result.ranking}
    counts = {
        e.sha256: e.image_counts
        for e in engine.store.entries()
        if (e.encoder_id, e.prompt_set_hash) == (engine.encoder.encoder_id, engine.prompt_set.hash)
    }
    picked = []
    for name in refined_contenders(result):
        row = rows.get(name)
        if row is None or not row.installed or row.sha256 not in listed or row.kind == "observed":
            continue  # nothing to render it with: it is still ranked among the contenders afterwards
        picked.append(listed[row.sha256])
    n = len(engine.prompt_set)
    plan = []
    for position, ckpt in enumerate(picked):
        have = counts.get(ckpt.sha256, [0] * n)
        target = budget
        if max_images is not None:
            share = (max_images - sum(k for *_, k in plan)) // (len(picked) - position)
            target = _largest_prefix(have, budget, share, n)
        images = missing_images(have, target) if target else 0
        if images:
            plan.append((ckpt, target, images))
    return plan


def _largest_prefix(have: Sequence[int], budget: Budget, share: int, n: int) -> Budget | None:
    """The largest prefix of ``budget`` (its first P prompts) whose missing images fit ``share``."""
    best = None
    for prompts in range(1, budget.prompt_count(n) + 1):
        candidate = Budget(prompts, budget.images_per_prompt)
        if missing_images(have, candidate) > share:
            break
        best = candidate
    return best


def refine(
    engine: Gmi,
    images: Sequence[Image.Image],
    source: CheckpointSource,
    generator: Generator,
    budget: Budget | str | None = REFINE_BUDGET,
    max_images: int | None = None,
    progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    before: IdentifyResult | None = None,
    **identify_options,
) -> RefineResult:
    """Identify, top up the contenders' specs to ``budget`` (at most ``max_images`` images in all), identify again.

    ``before``: a ranking of these images the caller already has (else it is computed). ``identify_options`` go to
    :meth:`Gmi.identify` (prompt, method, top_k, gamma, tau, include_not_installed, centre).
    """
    target = parse_budget(budget or REFINE_BUDGET)
    if max_images is not None and max_images < 0:
        raise GmiError(f"refine image cap must be >= 0, not {max_images}")
    top_k = identify_options.pop("top_k", None)  # contenders come from the whole ranking; rows are cut at the end
    if before is None:
        before = engine.identify(images, source=source, **identify_options)
    plan = refine_plan(engine, before, source, target, max_images)
    result = RefineResult(before, before, target.label(len(engine.prompt_set)), [(c.name, k) for c, _, k in plan])
    if plan:
        _render(engine, plan, generator, result, progress, should_cancel)
        if result.images_rendered:
            result.after = contenders_first(engine, images, source, before, identify_options)
    if top_k:
        result.before.ranking = result.before.ranking[:top_k]
        result.after.ranking = result.after.ranking[:top_k]
    return result


def contenders_first(
    engine: Gmi, images: Sequence[Image.Image], source: CheckpointSource, before: IdentifyResult, identify_options
) -> IdentifyResult:
    """The ranking after a refine: the contenders ranked among themselves on what they now hold, then the rows the
    first ranking had already set apart from them, in that ranking's order (their specs did not change).

    The contenders are ranked as a library of their own: the cells refine added (the full budget's extra prompts and
    seeds) are held by them alone, so a kernel width or a centring (the library's mean at each prompt) taken over the
    whole library would mix refined and unrefined rows; among themselves it is what the full budget gives them.
    """
    names = set(refined_contenders(before))
    among = {row.sha256 for row in before.ranking if row.name in names}
    after = engine.identify(images, source=source, among=among, **identify_options)
    rest = [row for row in before.ranking if row.sha256 not in among]
    after.ranking = [replace(row, rank=position) for position, row in enumerate(after.ranking + rest, start=1)]
    after.excluded = before.excluded
    return after


def _render(engine: Gmi, plan, generator: Generator, result: RefineResult, progress, should_cancel) -> None:
    """Build each planned spec to its budget (only missing cells), counting into ``result``; stops on Cancelled."""
    total = sum(k for *_, k in plan)
    started = time.perf_counter()

    def overall(p: BuildProgress) -> None:
        result.rendered[p.checkpoint] = p.images_rendered
        done = result.images_rendered
        per_image = (time.perf_counter() - started) / done if done else None
        if progress:
            progress(
                replace(
                    p,
                    images_planned=total,
                    images_rendered=done,
                    seconds_per_image=per_image,
                    eta_s=per_image * max(0, total - done) if per_image else None,
                )
            )

    for index, (ckpt, ckpt_budget, _) in enumerate(plan):
        try:
            engine.render_spec(ckpt, generator, ckpt_budget, overall, should_cancel, (index, len(plan)))
        except Exception as exc:  # a host's own interrupt exception is an interrupt too
            if isinstance(exc, Cancelled) or (should_cancel and should_cancel()):
                result.cancelled = True
                break
            if not isinstance(exc, (Busy, GmiError, RuntimeError, ValueError, OSError)):
                raise
            log.warning("gmi: refining the spec of %s failed: %s", ckpt.name, exc)
            result.failed.append((ckpt.name, f"{type(exc).__name__}: {one_line(exc)}"))
        finally:
            generator.release()
