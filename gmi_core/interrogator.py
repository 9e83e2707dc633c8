"""Pseudo-prompt from an image: rank gmi's shipped vocabulary by CLIP image-text similarity.

Label embeddings depend only on the encoder and the vocabulary, so they are cached on disk
(safetensors) per encoder and computed once.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .data import read_text
from .encoders import ClipEncoder
from .paths import atomic_write
from .store import safe_name

log = logging.getLogger(__name__)

# How many labels of each category go into the prompt, in prompt order.
PROMPT_LAYOUT = (("medium", 1), ("subject", 2), ("style", 2), ("lighting", 1), ("colour", 1), ("mood", 1))


def load_vocabulary() -> dict[str, list[str]]:
    return json.loads(read_text("vocabulary.json"))


@dataclass
class LabelScore:
    category: str
    label: str
    similarity: float


class Interrogator:
    def __init__(
        self, encoder: ClipEncoder, cache_dir: Path | None = None, vocabulary: dict[str, list[str]] | None = None
    ):
        self.encoder = encoder
        self.vocabulary = vocabulary or load_vocabulary()
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._embeddings: dict[str, torch.Tensor] | None = None

    def _vocab_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.vocabulary, sort_keys=True).encode()).hexdigest()[:12]

    def label_embeddings(self) -> dict[str, torch.Tensor]:
        """Per category, [n_labels, d] unit text features; read from or written to the disk cache."""
        if self._embeddings is not None:
            return self._embeddings
        cache = None
        if self.cache_dir:
            cache = self.cache_dir / f"labels--{safe_name(self.encoder.encoder_id)}--{self._vocab_hash()}.safetensors"
            if cache.is_file():
                try:
                    loaded = load_file(str(cache))
                    if set(loaded) == set(self.vocabulary) and all(
                        loaded[k].ndim == 2
                        and loaded[k].shape[0] == len(v)
                        and bool(torch.isfinite(loaded[k].float()).all())
                        for k, v in self.vocabulary.items()
                    ):
                        self._embeddings = {k: v.float() for k, v in loaded.items()}
                        return self._embeddings
                except Exception:  # noqa: BLE001 - a broken cache is recomputed, never trusted
                    pass
        # all categories in one call: the encoder batches them large, each batch cut to its longest label
        everything = self.encoder.encode_texts([label for labels in self.vocabulary.values() for label in labels])
        rows = torch.split(everything, [len(labels) for labels in self.vocabulary.values()])
        self._embeddings = {cat: part.contiguous() for cat, part in zip(self.vocabulary, rows)}
        if cache:  # best effort: identification works the same when the cache cannot be written
            try:
                with atomic_write(cache) as tmp:
                    save_file({k: v.contiguous() for k, v in self._embeddings.items()}, tmp)
            except OSError as exc:
                log.warning("gmi: label cache not written (%s)", exc.strerror or exc)
        return self._embeddings

    def rank_labels(self, image_features: torch.Tensor) -> dict[str, list[LabelScore]]:
        """Every label of every category, most similar first, for the mean of the given image features."""
        query = torch.nn.functional.normalize(image_features.float().mean(0), dim=0)
        ranked = {}
        for category, emb in self.label_embeddings().items():
            sims = emb @ query
            order = torch.argsort(sims, descending=True)
            labels = self.vocabulary[category]
            ranked[category] = [LabelScore(category, labels[i], float(sims[i])) for i in order.tolist()]
        return ranked

    def prompt_from_features(self, image_features: torch.Tensor) -> str:
        ranked = self.rank_labels(image_features)
        parts = []
        for category, count in PROMPT_LAYOUT:
            parts.extend(score.label for score in ranked.get(category, [])[:count])
        head = f"{parts[0]} of {parts[1]}" if len(parts) > 1 else "".join(parts)
        return ", ".join([head, *parts[2:]])

    def interrogate(self, images) -> str:
        return self.prompt_from_features(self.encoder.encode_images(list(images)))
