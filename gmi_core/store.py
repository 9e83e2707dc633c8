"""On-disk spec store: one file per (checkpoint sha256, encoder, prompt set), plus a manifest.

The manifest is a cache for fast listing; the spec files are the truth. Each file version (size and
mtime) is verified once, exactly as identification would load it, and the manifest remembers the
result: a spec that identification would refuse is listed as a problem, never as ready. A manifest
of the wrong shape is rebuilt; writing it is best effort, so listing works on a read-only store.

Listing runs on every identify, so a store object remembers the parsed manifest (until the file is
replaced) and each checkpoint folder's file names (until the folder changes); every spec file is
still stat-ed on every listing, so a changed file is never missed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import SpecError
from .paths import redact, write_json_atomic
from .spec import Spec, SpecKey, read_thumbnail

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
SETTLED_NS = 2 * 10**9  # a folder or manifest changed this recently may change again within its mtime tick: not cached


def file_stamp(st: os.stat_result) -> tuple[float, int, int]:
    """The version of a file a verification holds for: mtime, size and ctime (which ``utime`` cannot set back)."""
    return (st.st_mtime, st.st_size, st.st_ctime_ns)


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
    image_counts: list[int]  # rendered images per prompt (set order)
    size: int = -1
    family: str = ""
    ctime_ns: int = -1  # what os.utime cannot restore: an in-place change with its mtime put back is verified again

    @property
    def stamp(self) -> tuple[float, int, int]:
        return (self.mtime, self.size, self.ctime_ns)

    @property
    def images_done(self) -> int:
        return sum(self.image_counts)

    @property
    def key(self) -> SpecKey:
        return SpecKey(self.sha256, self.encoder_id, self.prompt_set_hash)


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


class SpecStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._manifest_cache: tuple[tuple, dict[str, ManifestEntry], dict[str, dict]] | None = None
        self._folder_cache: dict[str, tuple[int, list[str]]] = {}

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
        try:
            spec = Spec.load(path, verify=verify, thumbnails=thumbnails)
            if spec.key != key:
                raise SpecError(
                    f"spec file {path.name} holds the spec of another key ({spec.sha256[:10]}), not {key.sha256[:10]}"
                )
        except SpecError as exc:
            self.mark_corrupt(path, str(exc))
            raise
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
        self._update_manifest(path, spec)
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

    def remove_temp_files(self, key: SpecKey) -> int:
        """Temp files a killed writer of this spec left behind; call only while holding the spec's lock."""
        path = self.path_for(key)
        removed = 0
        for tmp in path.parent.glob(f"{path.name}.*.tmp") if path.parent.is_dir() else ():
            try:
                tmp.unlink()
                removed += 1
            except OSError:
                pass
        return removed

    # -- manifest -------------------------------------------------------------------------
    def entries(self) -> list[ManifestEntry]:
        """All usable specs in the store, from the manifest (each new file version verified once)."""
        return self.scan()[0]

    def scan(self) -> tuple[list[ManifestEntry], dict[str, str]]:
        """(usable specs, {relative file: why identification would refuse it}) — the reasons hold no server paths."""
        manifest, known_problems = self._read_manifest()
        files = self._spec_files()
        entries: dict[str, ManifestEntry] = {}
        problems: dict[str, dict] = {}
        dirty = set(manifest) | set(known_problems) != set(files)
        for rel in files:
            try:
                st = os.stat(os.path.join(self.root, rel))
            except OSError:
                continue
            stamp = file_stamp(st)
            entry, problem = manifest.get(rel), known_problems.get(rel)
            if entry is not None and entry.stamp == stamp:
                entries[rel] = entry
                continue
            if problem is not None and (problem["mtime"], problem["size"], problem["ctime_ns"]) == stamp:
                problems[rel] = problem
                continue
            dirty = True
            entry, reason = self._verify(self.root / rel, stamp)
            if entry is not None:
                entries[rel] = entry
            else:
                problems[rel] = {"mtime": stamp[0], "size": stamp[1], "ctime_ns": stamp[2], "reason": reason}
        if dirty:
            self._write_manifest(entries, problems)
        ordered = sorted(entries.values(), key=lambda e: (e.checkpoint_name.lower(), e.file))
        return ordered, {rel: p["reason"] for rel, p in problems.items()}

    def _spec_files(self) -> list[str]:
        """Spec files (``specs/<sha256>/<name>.safetensors``, relative to the root); a folder is re-read only
        when its mtime changed (writes are atomic renames, which change it)."""
        spec_dir = os.path.join(self.root, "specs")
        try:
            with os.scandir(spec_dir) as found:
                folders = [e.name for e in found if not e.name.startswith(".") and e.is_dir()]
        except OSError:
            return []
        files, cache = [], {}
        for folder in folders:
            path = os.path.join(spec_dir, folder)
            try:
                stamp = os.stat(path).st_mtime_ns
                cached = self._folder_cache.get(folder)
                if cached is None or cached[0] != stamp:
                    with os.scandir(path) as found:
                        cached = (
                            stamp,
                            sorted(
                                e.name for e in found if e.name.endswith(".safetensors") and not e.name.startswith(".")
                            ),
                        )
            except OSError:
                continue
            if time.time_ns() - stamp > SETTLED_NS:
                cache[folder] = cached
            files += [os.path.join("specs", folder, name) for name in cached[1]]
        self._folder_cache = cache
        return files

    def mark_corrupt(self, path: Path, reason: str) -> None:
        """Record that identification refused this file, so status shows it as corrupt too."""
        try:
            st = path.stat()
        except OSError:
            return
        rel = str(path.relative_to(self.root))
        entries, problems = self._read_manifest()
        entries.pop(rel, None)
        problems[rel] = {"mtime": st.st_mtime, "size": st.st_size, "ctime_ns": st.st_ctime_ns, "reason": redact(reason)}
        self._write_manifest(entries, problems)

    def fingerprint(self) -> str:
        """Changes whenever a spec file is written, replaced or removed."""
        return ";".join(f"{e.file}@{e.mtime}" for e in self.entries())

    def _verify(self, path: Path, stamp: tuple[float, int, int]) -> tuple[ManifestEntry | None, str]:
        """(entry, "") when identification would accept the file at this path, else (None, reason)."""
        try:
            spec = Spec.load(path)
            if self.path_for(spec.key) != path:
                raise SpecError(
                    f"spec file {path.name} holds the spec of {spec.sha256[:10]} and is trusted only at its own path"
                )
        except SpecError as exc:
            log.warning(
                "gmi: spec file %s is unusable (%s); it shows as corrupt and is rebuilt by 'build missing'", path, exc
            )
            return None, redact(str(exc))
        except OSError as exc:
            return None, f"unreadable ({exc.strerror or exc})"
        return self._entry_from_spec(path, spec, stamp), ""

    def _entry_from_spec(self, path: Path, spec: Spec, stamp: tuple[float, int, int]) -> ManifestEntry:
        return ManifestEntry(
            file=str(path.relative_to(self.root)),
            checkpoint_name=spec.checkpoint_name,
            sha256=spec.sha256,
            encoder_id=spec.encoder_id,
            prompt_set_hash=spec.prompt_set_hash,
            prompt_set_name=spec.prompt_set_name,
            complete=spec.complete,
            prompts_done=int(spec.done.sum()),
            prompts_total=spec.n_prompts,
            settings=spec.settings.to_dict(),
            images_per_prompt=spec.images_per_prompt,
            mtime=stamp[0],
            image_counts=[int(c) for c in spec.image_counts],
            size=stamp[1],
            family=spec.family,
            ctime_ns=stamp[2],
        )

    def _valid_entry(self, rel: str, fields) -> ManifestEntry | None:
        """A manifest entry of the right shape whose file name matches its own key; else None (re-verified)."""
        try:
            entry = ManifestEntry(**fields)
            ok = (
                entry.file == rel
                and all(
                    isinstance(getattr(entry, f), str)
                    for f in ("checkpoint_name", "encoder_id", "prompt_set_hash", "prompt_set_name")
                )
                and isinstance(entry.settings, dict)
                and all(
                    type(getattr(entry, f)) is int and getattr(entry, f) >= 0
                    for f in ("prompts_done", "prompts_total", "images_per_prompt", "size", "ctime_ns")
                )
                and isinstance(entry.mtime, (int, float))
                and isinstance(entry.complete, bool)
                and isinstance(entry.family, str)
                and isinstance(entry.image_counts, list)
                and len(entry.image_counts) == entry.prompts_total
                and all(type(c) is int and 0 <= c <= entry.images_per_prompt for c in entry.image_counts)
                and str(self.path_for(entry.key).relative_to(self.root)) == rel
            )
        except (TypeError, ValueError, SpecError):
            return None
        return entry if ok else None

    def _read_manifest(self) -> tuple[dict[str, ManifestEntry], dict[str, dict]]:
        """(entries, problems) as new dicts the caller may change; parsed again only when the file was replaced."""
        path = self.root / MANIFEST
        try:
            st = path.stat()
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            if self._manifest_cache is not None and self._manifest_cache[0] == stamp:
                return dict(self._manifest_cache[1]), dict(self._manifest_cache[2])
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}, {}
        entries, problems = self._parse_manifest(raw)
        if time.time_ns() - st.st_mtime_ns > SETTLED_NS:
            self._manifest_cache = (stamp, entries, problems)
        return dict(entries), dict(problems)

    def _parse_manifest(self, raw) -> tuple[dict[str, ManifestEntry], dict[str, dict]]:
        if not isinstance(raw, dict) or not isinstance(raw.get("entries"), dict):
            return {}, {}
        entries = {}
        for rel, fields in raw["entries"].items():
            entry = self._valid_entry(rel, fields) if isinstance(fields, dict) else None
            if entry is not None:
                entries[rel] = entry
        problems = {}
        raw_problems = raw.get("problems")
        for rel, item in raw_problems.items() if isinstance(raw_problems, dict) else ():
            if (
                isinstance(item, dict)
                and isinstance(item.get("reason"), str)
                and isinstance(item.get("mtime"), (int, float))
                and type(item.get("size")) is int
                and type(item.get("ctime_ns")) is int
            ):
                problems[rel] = {k: item[k] for k in ("mtime", "size", "ctime_ns")} | {"reason": item["reason"][:500]}
        return entries, problems

    def _write_manifest(self, entries: dict[str, ManifestEntry], problems: dict[str, dict] | None = None) -> None:
        """Best effort: the manifest is a cache, so a full disk or read-only store never fails a read."""
        data = {"entries": {rel: asdict(e) for rel, e in entries.items()}, "problems": problems or {}}
        try:
            write_json_atomic(self.root / MANIFEST, data)
        except (OSError, ValueError) as exc:
            log.warning("gmi: spec manifest not written (%s); listing reads the spec files again next time", exc)

    def _update_manifest(self, path: Path, spec: Spec) -> None:
        entries, problems = self._read_manifest()
        st = path.stat()
        entry = self._entry_from_spec(path, spec, file_stamp(st))
        entries[entry.file] = entry
        problems.pop(entry.file, None)
        self._write_manifest(entries, problems)

    def _drop_from_manifest(self, path: Path) -> None:
        entries, problems = self._read_manifest()
        rel = str(path.relative_to(self.root))
        entries.pop(rel, None)
        problems.pop(rel, None)
        self._write_manifest(entries, problems)
