"""Building or topping up one checkpoint's spec through any Generator, saving after every prompt.

A build renders only the cells of the budget the spec lacks (one generator call per prompt, all its missing
seeds at once), so a larger budget later adds images and never re-renders. A spec keeps the generation
settings it was started with; only ``restart`` (build "all") renders it again with the current ones.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

from .budgets import Budget, cell_seed
from .encoders import ClipEncoder
from .errors import Cancelled, GmiError, SpecError
from .images import to_rgb
from .loras import model_metadata
from .prompts import PromptSet
from .protocols import BuildProgress, CheckpointInfo, GenerationSettings, Generator, ProgressCallback
from .spec import Spec, SpecKey, pixel_feature, thumbnail
from .store import SpecStore

log = logging.getLogger(__name__)


def missing_images(image_counts, budget: Budget) -> int:
    """Images a build to ``budget`` renders for a spec with these per-prompt counts."""
    return sum(max(0, budget.images_per_prompt - image_counts[i]) for i in budget.prompt_indices(len(image_counts)))


def build_spec(
    *,
    store: SpecStore,
    encoder: ClipEncoder,
    prompt_set: PromptSet,
    prompt_features: torch.Tensor,
    checkpoint: CheckpointInfo,
    generator: Generator,
    settings: GenerationSettings,
    budget: Budget,
    base_seed: int = 0,
    progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    position: tuple[int, int] = (0, 1),
    restart: bool = False,
) -> Spec:
    """Generate, encode and store the budget's missing images; ``restart`` renders everything again.

    The old file is replaced only when the first new prompt is saved, so a rebuild that fails to start
    (unloadable checkpoint, cancelled at once) leaves the existing spec as it was.
    """
    n = len(prompt_set)
    spec = _spec_to_fill(store, encoder, prompt_set, prompt_features, checkpoint, settings, budget, base_seed, restart)
    spec.grow(budget.images_per_prompt, base_seed)
    spec.checkpoint_name = checkpoint.name
    spec.extra["kind"] = "generated"  # vs "observed" (gmi_core.observed); specs without the key are generated too
    spec.extra["model"] = model_metadata(checkpoint)  # checkpoint, or a LoRA's three parts (gmi_core.loras)
    if checkpoint.popularity is not None:
        spec.extra["popularity"] = checkpoint.popularity
    indices = budget.prompt_indices(n)
    need = budget.images_per_prompt
    rendered = 0

    def report(message: str) -> None:
        if progress:
            counts = spec.image_counts
            progress(
                BuildProgress(
                    checkpoint=checkpoint.name,
                    checkpoint_index=position[0],
                    checkpoint_count=position[1],
                    prompts_done=sum(counts[i] >= need for i in indices),
                    prompts_total=len(indices),
                    images_done=sum(min(counts[i], need) for i in indices),
                    images_total=len(indices) * need,
                    message=message,
                    images_rendered=rendered,
                )
            )

    report("resuming" if spec.image_done.any() else "starting")
    for i in indices:
        have = spec.image_counts[i]
        if have >= need:
            continue
        if should_cancel and should_cancel():
            raise Cancelled(f"build of {checkpoint.name} interrupted after {rendered} new images (saved)")
        images = generator.generate(checkpoint, spec.prompts[i], spec.seeds[i][have:need], spec.settings)
        if len(images) != need - have:
            raise GmiError(f"generator returned {len(images)} images for {need - have} seeds")
        images = [to_rgb(img) for img in images]
        spec.image_features[i, have:need] = encoder.encode_images(images).to(torch.float16)
        spec.pixel_features[i, have:need] = torch.from_numpy(np.stack([pixel_feature(img) for img in images])).to(
            torch.float16
        )
        if have == 0:
            spec.thumbnails[i] = torch.from_numpy(thumbnail(images[0]))
        spec.image_done[i, have:need] = True
        store.save(spec)
        rendered += need - have
        report(spec.prompts[i])
    return spec


def _spec_to_fill(
    store, encoder, prompt_set, prompt_features, checkpoint, settings, budget, base_seed, restart
) -> Spec:
    """The stored spec to resume, or a new empty one (nothing stored, unreadable - quarantined -, or ``restart``)."""
    key = SpecKey(checkpoint.sha256, encoder.encoder_id, prompt_set.hash)
    n = len(prompt_set)
    try:
        spec = store.load(key)
    except SpecError as exc:
        store.quarantine(key, str(exc))
        spec = None
    if spec is not None and not restart and spec.image_done.any():
        if spec.settings != settings:
            log.info("gmi: %s keeps the settings its spec was started with (%s)", checkpoint.name, spec.settings)
        return spec
    s = budget.images_per_prompt
    return Spec.empty(
        checkpoint_name=checkpoint.name,
        sha256=checkpoint.sha256,
        encoder_id=encoder.encoder_id,
        prompt_set_name=prompt_set.name,
        prompt_set_hash=prompt_set.hash,
        prompts=list(prompt_set.prompts),
        seeds=[[cell_seed(base_seed, i, j) for j in range(s)] for i in range(n)],
        settings=settings,
        prompt_features=prompt_features,
        feature_dim=encoder.dim,
        family=checkpoint.family or "",
    )
