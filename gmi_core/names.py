"""The one way a checkpoint name given by a user or a request becomes a checkpoint (issue 18, class 2).

A name matches exactly: a title, a file name (with or without its folder and extension), a full sha256, or a
sha256 prefix of at least :data:`gmi_core.limits.MIN_HASH_PREFIX` hex digits that only one checkpoint has.
Never a substring (the WebUI's ``get_closet_checkpoint_match`` turns "1" into the shortest title containing it);
a name that fits several checkpoints, or is not a string, is refused with the candidates listed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Generic, TypeVar

from .errors import CheckpointError, InvalidInput
from .limits import MAX_TEXT_FIELD, MIN_HASH_PREFIX

T = TypeVar("T")
HEX = re.compile(r"[0-9a-f]+")
TITLE = re.compile(r"(.+?) \[[0-9a-fA-F]{8,64}\]")
SHOWN = 8  # candidates named in an error


@dataclass(frozen=True)
class Named(Generic[T]):
    """One checkpoint as a resolver sees it: the names it answers to and what it resolves to."""

    item: T
    name: str  # file name relative to its model folder, as listed
    title: str = ""
    sha256: str | None = None

    def exact_names(self) -> set[str]:
        path = PurePosixPath(self.name.replace("\\", "/"))
        return {n for n in (self.name, self.title, path.name, str(path.with_suffix("")), path.stem) if n}


def resolve(query: object, candidates: Iterable[Named[T]]) -> T:
    """The one candidate ``query`` names exactly (see the module docstring)."""
    if not isinstance(query, str):
        raise InvalidInput(f"a checkpoint name must be a string, not {type(query).__name__}")
    text = query.strip()
    if not text:
        raise CheckpointError("no checkpoint named")
    if len(text) > MAX_TEXT_FIELD:
        raise InvalidInput("a checkpoint name is a title, file name or sha256, not a long text")
    candidates = list(candidates)
    titled = TITLE.fullmatch(text)  # "name [short hash]" with a stale hash: the name part, exactly
    if titled and not any(text in c.exact_names() for c in candidates):
        text = titled.group(1)
    by_name = [c for c in candidates if text in c.exact_names()]
    if by_name:
        return _one(text, by_name)
    digest = text.lower()
    if HEX.fullmatch(digest) and len(digest) >= MIN_HASH_PREFIX:
        return _one(text, [c for c in candidates if c.sha256 and c.sha256.lower().startswith(digest)])
    hint = f" (a hash needs at least {MIN_HASH_PREFIX} hex digits)" if HEX.fullmatch(digest) else ""
    raise CheckpointError(f"no checkpoint named {text[:200]!r}{hint}; {_listing(candidates)}")


def _one(text: str, matches: Sequence[Named[T]]) -> T:
    distinct = {id(m.item): m for m in matches}
    hashes = {m.sha256 for m in matches}
    if len(distinct) == 1 or (len(hashes) == 1 and None not in hashes):  # one file, or one file under several names
        return matches[0].item
    if not distinct:
        raise CheckpointError(f"no checkpoint has a sha256 starting with {text[:64]!r}")
    raise InvalidInput(
        f"{text[:200]!r} names {len(distinct)} checkpoints: {_names(distinct.values())}; give one exactly"
    )


def _names(candidates: Iterable[Named]) -> str:
    names = sorted(c.title or c.name for c in candidates)
    return ", ".join(names[:SHOWN]) + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


def _listing(candidates: Sequence[Named]) -> str:
    return f"checkpoints: {_names(candidates)}" if candidates else "no checkpoints are listed"
