"""Prompt sets: the platform set that specs are built from, and the disjoint evaluation set."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .data import read_text
from .errors import GmiError

BUILTIN_SETS = ("platform", "evaluation")


@dataclass(frozen=True)
class PromptSet:
    name: str
    prompts: tuple[str, ...]

    @property
    def hash(self) -> str:
        """Content hash: specs built from other prompts never match this set."""
        return hashlib.sha256(json.dumps(list(self.prompts)).encode()).hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.prompts)

    def head(self, n: int) -> PromptSet:
        """The first ``n`` prompts, as a set of its own (for quick builds and tests)."""
        return PromptSet(f"{self.name}[:{n}]", self.prompts[:n])


def load_prompt_set(name_or_path: str = "platform") -> PromptSet:
    """A built-in set by name, or a JSON list / text file with one prompt per line."""
    if name_or_path in BUILTIN_SETS:
        text = read_text(f"prompts_{name_or_path}.json")
        return PromptSet(name_or_path, tuple(json.loads(text)))
    path = Path(name_or_path)
    if not path.is_file():
        raise GmiError(f"prompt set {name_or_path!r} is neither a built-in set {BUILTIN_SETS} nor a file")
    text = path.read_text(encoding="utf-8")
    prompts = json.loads(text) if path.suffix == ".json" else [line.strip() for line in text.splitlines()]
    prompts = tuple(p for p in prompts if isinstance(p, str) and p.strip())
    if not prompts:
        raise GmiError(f"prompt set file {path} holds no prompts")
    return PromptSet(path.stem, prompts)
