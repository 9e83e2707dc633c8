"""What the engine's verbs return: spec status, build plan and report, and the ranking of an identification."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .limits import json_safe
from .protocols import CheckpointListing, SkippedCheckpoint

STATES = ("ready", "partial", "missing", "stale", "corrupt")


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
