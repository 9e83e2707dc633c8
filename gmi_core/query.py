"""A reference image set encoded once, and what identify was asked: the two things the ranking and the two-tier
index read (the image enters the engine here, nowhere else)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .encoders import ClipEncoder
from .images import to_rgb
from .interrogator import Interrogator
from .protocols import CheckpointSource
from .spec import pixel_feature


@dataclass(frozen=True)
class Query:
    images: torch.Tensor  # [Q, d] CLIP image features of the reference images
    text: torch.Tensor  # [d] CLIP text feature of the prompt
    pixels: torch.Tensor  # [Q, p] pixel features (rkme_basic)
    prompt: str  # the user's prompt, else the interrogator's pseudo-prompt
    prompt_source: str  # "user" or "interrogator"


def encode_query(
    encoder: ClipEncoder, interrogator: Interrogator, images: Sequence[Image.Image], prompt: str | None
) -> Query:
    """The features identify compares; without a prompt the interrogator guesses one from the image features."""
    images = [to_rgb(i) for i in images]
    features = encoder.encode_images(images)
    if prompt and prompt.strip():
        pseudo, prompt_source = prompt.strip(), "user"
    else:
        pseudo, prompt_source = interrogator.prompt_from_features(features), "interrogator"
    text = encoder.encode_texts([pseudo])[0]
    pixels = torch.from_numpy(np.stack([pixel_feature(i) for i in images]))
    return Query(features, text, pixels, pseudo, prompt_source)


@dataclass(frozen=True)
class IdentifyRequest:
    """One identification's options, checked (:func:`gmi_core.limits.check_identify`)."""

    method: str
    top_k: int | None
    gamma: float | None
    tau: float | None
    source: CheckpointSource | None  # the installed checkpoints (None: every spec in the store)
    include_not_installed: bool
    centre: bool
