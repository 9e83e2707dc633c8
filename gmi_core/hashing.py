"""sha256 of checkpoint files, cached by (path, size, mtime) so each file is read once."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from pathlib import Path

from .store import write_json_atomic

log = logging.getLogger(__name__)
_LOCK = threading.Lock()
CHUNK = 1 << 20
SHA256 = re.compile(r"[0-9a-f]{64}")


def short_hash(sha256: str) -> str:
    """A1111 / Civitai short hash: the first 10 hex digits."""
    return sha256[:10]


def _stamp(path: Path) -> tuple[str, list[int]]:
    stat = path.stat()
    return str(path), [stat.st_size, stat.st_mtime_ns]


def _valid_entry(entry) -> bool:
    """{"stamp": [size, mtime_ns], "sha256": 64 lowercase hex}; anything else is dropped and rehashed."""
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) or not SHA256.fullmatch(entry["sha256"]):
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


def cached_sha256(path: Path, cache_path: Path | None) -> str | None:
    """The cached sha256 while the file's size and mtime are unchanged, else None."""
    if cache_path is None:
        return None
    key, stamp = _stamp(Path(path).resolve())
    hit = _read_cache(cache_path).get(key)
    return hit["sha256"] if isinstance(hit, dict) and hit.get("stamp") == stamp else None


def sha256_file(path: Path, cache_path: Path | None = None) -> str:
    """The file's sha256; with ``cache_path``, reused while the file's size and mtime are unchanged."""
    path = Path(path).resolve()
    hit = cached_sha256(path, cache_path)
    if hit is not None:
        return hit
    key, stamp = _stamp(path)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    value = digest.hexdigest()
    if cache_path is not None:
        with _LOCK:
            cache = _read_cache(cache_path)
            cache[key] = {"stamp": stamp, "sha256": value}
            try:
                write_json_atomic(Path(cache_path), cache)
            except OSError as exc:  # best effort: a hash is still right when the cache cannot be written
                log.warning("gmi: hash cache not written (%s); the file will be hashed again next time", exc.strerror or exc)
    return value
