"""sha256 of checkpoint files, cached by (path, size, mtime) so each file is read once."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

from .store import write_json_atomic

_LOCK = threading.Lock()
CHUNK = 1 << 20


def short_hash(sha256: str) -> str:
    """A1111 / Civitai short hash: the first 10 hex digits."""
    return sha256[:10]


def _stamp(path: Path) -> tuple[str, list[int]]:
    stat = path.stat()
    return str(path), [stat.st_size, stat.st_mtime_ns]


def _read_cache(cache_path: Path) -> dict:
    try:
        return json.loads(Path(cache_path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


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
            write_json_atomic(Path(cache_path), cache)
    return value
