"""On-disk spec store: one file per (checkpoint sha256, encoder, prompt set), plus a manifest.

The manifest is a cache for fast listing; the spec files are the truth. A missing or broken
manifest is rebuilt from the files' headers (no tensors are read for that).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from safetensors import safe_open

from .errors import SpecError
from .spec import Spec, SpecKey, read_thumbnail

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


@dataclass
class ManifestEntry:
    file: str  # relative to the store root
    checkpoint_name: str
    sha256: str
    encoder_id: str
    prompt_set_hash: str
    prompt_set_name: str
    complete: bool
    prompts_done: int
    prompts_total: int
    settings: dict
    images_per_prompt: int
    mtime: float

    @property
    def key(self) -> SpecKey:
        return SpecKey(self.sha256, self.encoder_id, self.prompt_set_hash)


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def write_json_atomic(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=1)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class SpecStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path_for(self, key: SpecKey) -> Path:
        if not re.fullmatch(r"[0-9a-f]{64}", key.sha256):
            raise SpecError(f"not a sha256: {key.sha256!r}")
        name = f"{safe_name(key.encoder_id)}--{safe_name(key.prompt_set_hash)}.safetensors"
        return self.root / "specs" / key.sha256 / name

    def load(self, key: SpecKey, verify: bool = True, thumbnails: bool = True) -> Spec | None:
        """The spec for ``key``, None if there is none; raises SpecError if the file is corrupt.

        ``verify`` and ``thumbnails``: see :meth:`Spec.load`."""
        path = self.path_for(key)
        if not path.exists():
            return None
        spec = Spec.load(path, verify=verify, thumbnails=thumbnails)
        if spec.key != key:
            raise SpecError(f"spec file {path} holds {spec.key}, not {key}")
        return spec

    def thumbnail(self, key: SpecKey, prompt_index: int):
        """One prompt's [64, 64, 3] uint8 thumbnail read from the file (no full load); None if unfinished."""
        path = self.path_for(key)
        if not path.exists():
            raise SpecError(f"no spec for {key.sha256[:10]}")
        return read_thumbnail(path, prompt_index)

    def save(self, spec: Spec) -> Path:
        path = self.path_for(spec.key)
        spec.save(path)
        self._update_manifest(path)
        return path

    def quarantine(self, key: SpecKey, reason: str) -> Path | None:
        """Move a corrupt file aside (kept for inspection, never used) so it can be rebuilt."""
        path = self.path_for(key)
        if not path.exists():
            return None
        target = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
        os.replace(path, target)
        log.warning("gmi: spec %s is corrupt (%s); moved to %s", path, reason, target)
        self._drop_from_manifest(path)
        return target

    # -- manifest -------------------------------------------------------------------------
    def entries(self) -> list[ManifestEntry]:
        """All specs in the store, from the manifest (rebuilt from file headers when stale)."""
        manifest = self._read_manifest()
        files = {str(p.relative_to(self.root)): p for p in (self.root / "specs").glob("*/*.safetensors")}
        entries = {}
        dirty = set(manifest) != set(files)
        for rel, path in files.items():
            entry = manifest.get(rel)
            if entry is None or entry.mtime != path.stat().st_mtime:
                entry = self._entry_from_header(path)
                dirty = True
            if entry is not None:
                entries[rel] = entry
        if dirty:
            self._write_manifest(entries)
        return sorted(entries.values(), key=lambda e: (e.checkpoint_name.lower(), e.file))

    def fingerprint(self) -> str:
        """Changes whenever a spec file is written, replaced or removed."""
        return ";".join(f"{e.file}@{e.mtime}" for e in self.entries())

    def _entry_from_header(self, path: Path) -> ManifestEntry | None:
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = json.loads((handle.metadata() or {})["gmi"])
                done = handle.get_slice("done")[:]
                shape = handle.get_slice("image_features").get_shape()
            return ManifestEntry(
                file=str(path.relative_to(self.root)),
                checkpoint_name=meta["checkpoint_name"],
                sha256=meta["sha256"],
                encoder_id=meta["encoder_id"],
                prompt_set_hash=meta["prompt_set"]["hash"],
                prompt_set_name=meta["prompt_set"]["name"],
                complete=bool(meta["complete"]),
                prompts_done=int(done.sum()),
                prompts_total=int(shape[0]),
                settings=dict(meta["settings"]),
                images_per_prompt=int(shape[1]),
                mtime=path.stat().st_mtime,
            )
        except Exception as exc:  # noqa: BLE001 - any unreadable header means "not listed"
            log.warning("gmi: spec file %s is unreadable (%s); it will be rebuilt when needed", path, exc)
            return None

    def _read_manifest(self) -> dict[str, ManifestEntry]:
        path = self.root / MANIFEST
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            return {rel: ManifestEntry(**fields) for rel, fields in raw["entries"].items()}
        except (OSError, ValueError, KeyError, TypeError):
            return {}

    def _write_manifest(self, entries: dict[str, ManifestEntry]) -> None:
        write_json_atomic(self.root / MANIFEST, {"entries": {rel: asdict(e) for rel, e in entries.items()}})

    def _update_manifest(self, path: Path) -> None:
        entries = self._read_manifest()
        entry = self._entry_from_header(path)
        if entry is not None:
            entries[entry.file] = entry
            self._write_manifest(entries)

    def _drop_from_manifest(self, path: Path) -> None:
        entries = self._read_manifest()
        entries.pop(str(path.relative_to(self.root)), None)
        self._write_manifest(entries)
