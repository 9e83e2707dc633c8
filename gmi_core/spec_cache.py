"""Which spec file versions were already verified (content checksum and value checks), kept on disk.

A spec file is written once per finished prompt and then read on every identification, in every new
process. Verifying it (sha256 over its tensors, finiteness, unit norms) is most of a cold load, so it is
done once per file version, keyed like the checkpoint hash cache by (path, size, mtime).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from .store import write_json_atomic


def _stamp(path: Path) -> list[int]:
    stat = Path(path).stat()
    return [stat.st_size, stat.st_mtime_ns]


class VerifiedSpecs:
    def __init__(self, record: Path):
        self.record = Path(record)
        self._lock = threading.Lock()
        try:
            data = json.loads(self.record.read_text(encoding="utf-8"))
            self._stamps = data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            self._stamps = {}
        self._dirty = False

    def trusted(self, path: Path) -> bool:
        """True while the file is the version that was verified."""
        try:
            return self._stamps.get(str(path)) == _stamp(path)
        except OSError:
            return False

    def mark(self, path: Path) -> None:
        with self._lock:
            self._stamps[str(path)] = _stamp(path)
            self._dirty = True

    def save(self) -> None:
        """One write for a whole batch of loads."""
        with self._lock:
            if self._dirty:
                write_json_atomic(self.record, self._stamps)
                self._dirty = False
