"""Building one checkpoint's spec through any Generator, saving after every prompt so nothing is lost."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

from .encoders import ClipEncoder
from .errors import Cancelled, GmiError, SpecError
from .images import to_rgb
from .prompts import PromptSet
from .protocols import BuildProgress, CheckpointInfo, GenerationSettings, Generator, ProgressCallback
from .spec import Spec, SpecKey, pixel_feature, thumbnail
from .store import SpecStore

log = logging.getLogger(__name__)


def spec_seeds(prompt_count: int, images_per_prompt: int, base_seed: int) -> list[list[int]]:
    """Distinct, reproducible seeds: prompt i, image s gets base + i * S + s."""
    return [[base_seed + i * images_per_prompt + s for s in range(images_per_prompt)] for i in range(prompt_count)]


def matches_request(spec: Spec, seeds: list[list[int]], settings: GenerationSettings) -> bool:
    """Whether an existing spec was built the way we would build it now (else it is stale)."""
    return spec.seeds == seeds and spec.settings == settings


def build_spec(
    *,
    store: SpecStore,
    encoder: ClipEncoder,
    prompt_set: PromptSet,
    prompt_features: torch.Tensor,
    checkpoint: CheckpointInfo,
    generator: Generator,
    settings: GenerationSettings,
    images_per_prompt: int,
    base_seed: int = 0,
    progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    position: tuple[int, int] = (0, 1),
    restart: bool = False,
) -> Spec:
    """Generate, encode and store; resumes a partial spec built with the same settings unless ``restart``.

    The old file is replaced only when the first new prompt is saved, so a rebuild that fails to start
    (unloadable checkpoint, cancelled at once) leaves the existing spec as it was.
    """
    key = SpecKey(checkpoint.sha256, encoder.encoder_id, prompt_set.hash)
    seeds = spec_seeds(len(prompt_set), images_per_prompt, base_seed)
    try:
        spec = store.load(key)
    except SpecError as exc:
        store.quarantine(key, str(exc))
        spec = None
    if spec is not None and restart:
        spec = None
    elif spec is not None and not matches_request(spec, seeds, settings):
        log.info("gmi: spec of %s was built with other settings; rebuilding", checkpoint.name)
        spec = None
    if spec is None:
        spec = Spec.empty(
            checkpoint_name=checkpoint.name,
            sha256=checkpoint.sha256,
            encoder_id=encoder.encoder_id,
            prompt_set_name=prompt_set.name,
            prompt_set_hash=prompt_set.hash,
            prompts=list(prompt_set.prompts),
            seeds=seeds,
            settings=settings,
            prompt_features=prompt_features,
            feature_dim=encoder.dim,
        )
    spec.checkpoint_name = checkpoint.name
    spec.extra["kind"] = "generated"  # vs "observed" (gmi_core.observed); specs without the key are generated too
    if checkpoint.popularity is not None:
        spec.extra["popularity"] = checkpoint.popularity
    total = len(prompt_set)

    def report(message: str) -> None:
        if progress:
            done = int(spec.done.sum())
            progress(
                BuildProgress(
                    checkpoint=checkpoint.name,
                    checkpoint_index=position[0],
                    checkpoint_count=position[1],
                    prompts_done=done,
                    prompts_total=total,
                    images_done=done * images_per_prompt,
                    images_total=total * images_per_prompt,
                    message=message,
                )
            )

    report("resuming" if spec.done.any() else "starting")
    for i, prompt in enumerate(prompt_set.prompts):
        if spec.done[i]:
            continue
        if should_cancel and should_cancel():
            raise Cancelled(f"build of {checkpoint.name} interrupted after {int(spec.done.sum())}/{total} prompts (saved)")
        images = generator.generate(checkpoint, prompt, seeds[i], settings)
        if len(images) != images_per_prompt:
            raise GmiError(f"generator returned {len(images)} images for {images_per_prompt} seeds")
        images = [to_rgb(img) for img in images]
        spec.image_features[i] = encoder.encode_images(images).to(torch.float16)
        spec.pixel_features[i] = torch.from_numpy(np.stack([pixel_feature(img) for img in images])).to(torch.float16)
        spec.thumbnails[i] = torch.from_numpy(thumbnail(images[0]))
        spec.done[i] = True
        store.save(spec)
        report(prompt)
    return spec
