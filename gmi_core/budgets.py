"""Spec budgets that grow: how many prompts and images per prompt a spec holds, in a fixed order.

Every budget is a prefix of a larger one. Prompts are taken in one fixed interleaved order of the prompt set
(:func:`prompt_order`), so the first 16 already span the whole set, and image ``s`` of prompt ``i`` always has
the seed ``base + i * SEED_STRIDE + s``. A spec built to a small budget is ranked at once; building a larger
budget later only renders the images it lacks.

The default (``standard``, 32 prompts x 2 images = 64 images) was chosen from the measured budget curve
(``bench synthetic``, ``results_budget``; see docs/results.md): of the budgets of at most 64 images it comes closest to
the full budget on the difficulty family (e_subtle_x16 top-1 0.771 against 0.844 for 55 x 4; 55 x 1 gives
0.708), and it matches the full budget on Example B.1 and every easier family. No budget of at most 64 images
comes within 0.02 of the full one on e_subtle_x16, with the default estimator or with centring (0.844 against
0.931; ``results_budget_by_estimator``): closely similar checkpoints need the full budget.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from .errors import InvalidInput
from .limits import MAX_BUDGET_PROMPTS, MAX_IMAGES_PER_PROMPT

SEED_STRIDE = 1000  # seeds of one prompt: base + i * SEED_STRIDE + s, s < MAX_IMAGES_PER_PROMPT
_GOLDEN = 0.6180339887498949


@dataclass(frozen=True)
class Budget:
    """``prompts`` first prompts of :func:`prompt_order` (None: all) x ``images_per_prompt`` images."""

    prompts: int | None
    images_per_prompt: int
    name: str = ""

    def prompt_count(self, set_size: int) -> int:
        return set_size if self.prompts is None else min(self.prompts, set_size)

    def prompt_indices(self, set_size: int) -> list[int]:
        """The prompts (indices into the set) this budget covers, in build order."""
        return list(_prompt_order(set_size)[: self.prompt_count(set_size)])

    def images(self, set_size: int) -> int:
        return self.prompt_count(set_size) * self.images_per_prompt

    def size_label(self, set_size: int | None = None) -> str:
        """``PxS``, e.g. ``55x1`` (``allx1`` for every prompt of a set of unknown size)."""
        count = self.prompts if set_size is None else self.prompt_count(set_size)
        return f"{'all' if count is None else count}x{self.images_per_prompt}"

    def label(self, set_size: int | None = None) -> str:
        size = self.size_label(set_size)
        return f"{self.name} ({size})" if self.name else size

    def to_dict(self, set_size: int) -> dict:
        return {
            "name": self.name or self.label(set_size),
            "prompts": self.prompt_count(set_size),
            "images_per_prompt": self.images_per_prompt,
            "images": self.images(set_size),
        }


BUDGETS: dict[str, Budget] = {
    "quick": Budget(16, 1, "quick"),
    "standard": Budget(32, 2, "standard"),
    "full": Budget(55, 4, "full"),
}
DEFAULT_BUDGET = "standard"
CURVE = tuple(Budget(p, s) for p, s in ((16, 1), (32, 1), (55, 1), (16, 4), (32, 2), (55, 2), (55, 4)))  # benchmarked


def parse_budget(value: str | Budget | None) -> Budget:
    """A named budget (quick, standard, full) or ``PxS`` (``16x1``, ``allx4``)."""
    if isinstance(value, Budget):
        return value
    text = (value or DEFAULT_BUDGET).strip().lower()
    if text in BUDGETS:
        return BUDGETS[text]
    match = re.fullmatch(r"(\d+|all)\s*[x\u00d7]\s*(\d+)", text)
    if not match:
        raise InvalidInput(f"budget {value!r}: choose {', '.join(BUDGETS)} or PROMPTSxIMAGES such as 32x2")
    prompts = None if match[1] == "all" else int(match[1])
    images = int(match[2])
    if prompts is not None and not 1 <= prompts <= MAX_BUDGET_PROMPTS:
        raise InvalidInput(f"budget {value!r}: prompts must be between 1 and {MAX_BUDGET_PROMPTS}")
    if not 1 <= images <= MAX_IMAGES_PER_PROMPT:
        raise InvalidInput(f"budget {value!r}: images per prompt must be between 1 and {MAX_IMAGES_PER_PROMPT}")
    return Budget(prompts, images)


def prompt_order(set_size: int) -> list[int]:
    """A fixed interleaving of a prompt set: any prefix is spread evenly over the file (golden-ratio order)."""
    return list(_prompt_order(set_size))


@lru_cache(maxsize=64)
def _prompt_order(set_size: int) -> tuple[int, ...]:  # computed once per set size: identify asks per checkpoint
    return tuple(sorted(range(set_size), key=lambda i: ((i * _GOLDEN) % 1.0, i)))


def cell_seed(base_seed: int, prompt_index: int, image_index: int) -> int:
    """The seed of image ``image_index`` of prompt ``prompt_index``: the same whatever the budget."""
    return base_seed + prompt_index * SEED_STRIDE + image_index


def covered_budget(image_counts, set_size: int) -> str | None:
    """The largest named budget that per-prompt image counts cover, or None."""
    order = _prompt_order(set_size)
    best = None
    for name, budget in BUDGETS.items():
        if all(image_counts[i] >= budget.images_per_prompt for i in order[: budget.prompt_count(set_size)]):
            best = name
    return best
