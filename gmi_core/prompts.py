"""Prompt sets: the platform set that specs are built from, and the disjoint evaluation set."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .data import read_text
from .errors import GmiError
from .limits import MAX_PROMPT_SET_BYTES, MAX_PROMPT_SET_PROMPTS, MAX_TEXT_FIELD

DEFAULT_PROMPT_SET = "platform"  # the set specs are built from
BUILTIN_SETS = (DEFAULT_PROMPT_SET, "evaluation")


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


def parse_prompts(text: str, as_json: bool, label: str) -> tuple[str, ...]:
    """Prompts from a JSON list of strings, or from text with one prompt per line; GmiError for anything else."""
    if as_json:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise GmiError(f"prompt set {label}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
        if not isinstance(data, list) or not all(isinstance(p, str) for p in data):
            raise GmiError(f"prompt set {label}: a .json prompt set must be a list of strings")
        prompts = [p.strip() for p in data]
    else:
        prompts = [line.strip() for line in text.splitlines()]
    prompts = tuple(p for p in prompts if p)
    if not prompts:
        raise GmiError(f"prompt set {label} holds no prompts")
    if len(prompts) > MAX_PROMPT_SET_PROMPTS:
        raise GmiError(f"prompt set {label} has {len(prompts)} prompts; at most {MAX_PROMPT_SET_PROMPTS}")
    long = next((i for i, p in enumerate(prompts) if len(p) > MAX_TEXT_FIELD), None)
    if long is not None:
        raise GmiError(f"prompt set {label}: prompt {long + 1} is longer than {MAX_TEXT_FIELD} characters")
    return prompts


def load_prompt_set(name_or_path: str = DEFAULT_PROMPT_SET) -> PromptSet:
    """A built-in set by name, or a JSON list of strings / a text file with one prompt per line.

    Any path is read: callers that take names from requests confine them first (gmi_core.paths).
    """
    if name_or_path in BUILTIN_SETS:
        text = read_text(f"prompts_{name_or_path}.json")
        return PromptSet(name_or_path, tuple(json.loads(text)))
    path = Path(name_or_path)
    label = repr(path.name)
    if not path.exists():
        raise GmiError(f"prompt set {name_or_path!r} is neither a built-in set {BUILTIN_SETS} nor a file")
    if not path.is_file():
        raise GmiError(f"prompt set {label}: not a regular file")
    try:
        if path.stat().st_size > MAX_PROMPT_SET_BYTES:
            raise GmiError(f"prompt set {label} is larger than {MAX_PROMPT_SET_BYTES // (1024 * 1024)} MiB")
        raw = path.read_bytes()
    except OSError as exc:
        raise GmiError(f"prompt set {label} cannot be read ({exc.strerror})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise GmiError(
            f"prompt set {label} is not UTF-8 text (a JSON list of strings or one prompt per line)"
        ) from None
    if "\x00" in text:
        raise GmiError(f"prompt set {label} is a binary file, not a JSON list of strings or one prompt per line")
    return PromptSet(path.stem, parse_prompts(text, path.suffix.lower() == ".json", label))
