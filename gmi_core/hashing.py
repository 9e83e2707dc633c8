"""sha256 of checkpoint files, cached by (path, size, mtime) so each file is read once.

:class:`HashCache` reads the cache file once and answers from memory, so listing M checkpoints
costs M ``stat`` calls, not M reads of the whole cache. Besides the sha256 it remembers other facts
about a file version (what its header says), so a listing does not re-parse M headers either.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from collections.abc import Callable
from pathlib import Path

from .paths import write_json_atomic

log = logging.getLogger(__name__)
_LOCK = threading.Lock()
CHUNK = 1 << 20
SHA256 = re.compile(r"[0-9a-f]{64}")
HASH_CACHE_FILE = "hashes.json"  # in gmi's data folder (CLI home, ComfyUI user/gmi, A1111 spec folder)


def short_hash(sha256: str) -> str:
    """A1111 / Civitai short hash: the first 10 hex digits."""
    return sha256[:10]


def _stamp(path: Path) -> tuple[str, list[int]]:
    stat = path.stat()
    return str(path), [stat.st_size, stat.st_mtime_ns]


def _valid_entry(entry) -> bool:
    """{"stamp": [size, mtime_ns], "sha256": 64 lowercase hex (once hashed), other facts}; anything else is
    dropped and recomputed."""
    if not isinstance(entry, dict):
        return False
    if "sha256" in entry and not (isinstance(entry["sha256"], str) and SHA256.fullmatch(entry["sha256"])):
        return False
    stamp = entry.get("stamp")
    return isinstance(stamp, list) and len(stamp) == 2 and all(type(v) is int and v >= 0 for v in stamp)


def _read_cache(cache_path: Path) -> dict:
    """The cache's valid entries; a missing, unreadable or malformed cache reads as empty (rebuilt on write)."""
    try:
        data = json.loads(Path(cache_path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and _valid_entry(v)}


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


class HashCache:
    """One read of the cache file; per file version (size, mtime) its sha256 and remembered facts."""

    def __init__(self, cache_path: Path | None):
        self.cache_path = Path(cache_path) if cache_path is not None else None
        self.entries = _read_cache(self.cache_path) if self.cache_path is not None else {}
        self._changed: set[str] = set()

    def _current(self, path: Path) -> tuple[str, list[int], dict]:
        key, stamp = _stamp(Path(path).resolve())
        entry = self.entries.get(key)
        if not isinstance(entry, dict) or entry.get("stamp") != stamp:
            entry = {"stamp": stamp}
        return key, stamp, entry

    def sha256(self, path: Path, on_hashing: Callable[[Path], None] | None = None) -> str:
        """The file's sha256, hashed (and saved at once: hashing is the slow part) only when not cached."""
        key, _, entry = self._current(path)
        if "sha256" not in entry:
            if on_hashing:
                on_hashing(Path(path))
            entry["sha256"] = _digest(Path(path).resolve())
            self.entries[key] = entry
            self._changed.add(key)
            self.save()
        return entry["sha256"]

    def remember(self, path: Path, fact: str, compute: Callable[[], object]):
        """A JSON-able fact about this file version, computed once (saved with the next :meth:`save`)."""
        key, _, entry = self._current(path)
        if fact not in entry:
            entry[fact] = compute()
            self.entries[key] = entry
            self._changed.add(key)
        return entry[fact]

    def save(self) -> None:
        """Write changed entries, merged into what other processes may have written meanwhile."""
        if self.cache_path is None or not self._changed:
            return
        with _LOCK:
            on_disk = _read_cache(self.cache_path)
            on_disk.update({key: self.entries[key] for key in self._changed})
            try:
                write_json_atomic(self.cache_path, on_disk)
            except OSError as exc:  # best effort: a hash is still right when the cache cannot be written
                log.warning(
                    "gmi: hash cache not written (%s); the file will be hashed again next time", exc.strerror or exc
                )
            self.entries = on_disk
            self._changed.clear()


def sha256_file(path: Path, cache_path: Path | None = None) -> str:
    """The file's sha256; with ``cache_path``, reused while the file's size and mtime are unchanged."""
    if cache_path is None:
        return _digest(Path(path).resolve())
    return HashCache(cache_path).sha256(path)
