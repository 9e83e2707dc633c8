"""The usable specs of one encoder and prompt set: read from the store and kept while their files are unchanged,
merged with the observed specs, stacked into the ranker's bank, and the two-tier index that shortlists them at
model-hub scale. The engine (:class:`gmi_core.engine.Gmi`) asks it for what to rank."""

from __future__ import annotations

import contextlib
import ctypes
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from . import limits
from .errors import GmiError, NoSpecsError, SpecError
from .index import INDEX_CANDIDATES, MAX_RERANKED, StoreIndex, prefetch, updated_index
from .observed import OBSERVED, merge, spec_kind
from .protocols import CheckpointInfo, CheckpointSource, ListedCheckpoints
from .query import IdentifyRequest, Query
from .ranker import FeatureBank, prompt_weights
from .spec import Spec, SpecKey
from .store import ManifestEntry, SpecStore, file_stamp, safe_name

log = logging.getLogger(__name__)
INDEXED_METHODS = ("gmi", "rkme_clip")  # the methods the two-tier index prefilters for


def _return_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc). Stacking the bank frees one spec's features at a time,
    and glibc would otherwise keep those pages: the process would hold the features twice."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@dataclass
class LoadedSpec:
    """A usable spec and how its checkpoint stands on this machine (known from the listing, not from the file)."""

    spec: Spec
    installed: bool = True  # False: an imported spec of a checkpoint that is not on this machine
    aliases: list[str] = field(default_factory=list)  # other file names with the same sha256
    popularity: float | None = None  # the listing's, else the one the spec file stored


@dataclass
class LoadedSpecs:
    """The specs to rank and (name, reason) for the checkpoints left out."""

    items: list[LoadedSpec] = field(default_factory=list)
    excluded: list[tuple[str, str]] = field(default_factory=list)

    @property
    def specs(self) -> list[Spec]:
        return [item.spec for item in self.items]

    @property
    def installed(self) -> list[bool]:
        return [item.installed for item in self.items]

    @property
    def popularity(self) -> list[float | None]:
        return [item.popularity for item in self.items]


@dataclass
class Candidates:
    """What the exact ranker orders for one query: the specs, their stacked bank and the kernel width (None:
    the median heuristic)."""

    loaded: LoadedSpecs
    bank: FeatureBank
    gamma: float | None


class SpecLibrary:
    """The specs of one encoder and prompt set in a store, read once per file version."""

    def __init__(self, store: SpecStore, encoder_id: str, prompt_set_hash: str):
        self.store = store
        self.encoder_id = encoder_id
        self.prompt_set_hash = prompt_set_hash
        self._bank_cache: tuple[tuple, FeatureBank] | None = None
        self._spec_cache: dict[str, tuple[float, Spec | None]] = {}
        self._merged_cache: dict[str, tuple] = {}
        self._loaded_versions: tuple = ()  # (file, stamp) of the specs the last load listed
        self._index: StoreIndex | None = None

    def key(self, sha256: str, prompt_set_hash: str | None = None) -> SpecKey:
        return SpecKey(sha256, self.encoder_id, prompt_set_hash or self.prompt_set_hash)

    def listed(self) -> list[ManifestEntry]:
        """This encoder's entries in the store listing."""
        return [e for e in self.store.entries() if e.encoder_id == self.encoder_id]

    def load(
        self,
        source: CheckpointSource | None = None,
        include_not_installed: bool = False,
        only: set[str] | None = None,
        listed: list[ManifestEntry] | None = None,
    ) -> LoadedSpecs:
        """Usable specs for this encoder and prompt set, and (name, reason) for those left out.

        A checkpoint's generated spec and its observed spec (:mod:`gmi_core.observed`) become one.
        Specs of checkpoints the source does not list (imported ones) are left out unless
        ``include_not_installed``; they then are marked not installed. ``only``: just these sha256
        (the index's candidates), read from their files and not kept in memory. ``listed``: this encoder's store
        entries when the caller has listed the store already.
        """
        wanted, aliases, excluded = self._installed(source)
        if listed is None:
            listed = self.listed()
        entries = [e for e in listed if e.prompt_set_hash in (self.prompt_set_hash, OBSERVED)]
        self._loaded_versions = tuple((e.file, e.stamp) for e in entries)  # the bank's key: no second store listing
        found = {e.sha256 for e in entries}
        if wanted is not None:
            excluded += [(c.name, self._why_unusable(c)) for sha, c in wanted.items() if sha not in found]
            foreign = {e.sha256 for e in entries if e.sha256 not in wanted}
            if foreign and not include_not_installed:
                excluded.append(
                    (
                        f"{len(foreign)} checkpoint(s) not installed",
                        "imported specs; include them with the not-installed option",
                    )
                )
                entries = [e for e in entries if e.sha256 in wanted]
        if only is not None:
            entries = [e for e in entries if e.sha256 in only]
        parts = self._read_parts(entries, keep=only is None, excluded=excluded)
        loaded = LoadedSpecs(excluded=excluded)
        for sha, pair in parts.items():
            if not pair:
                continue
            spec = self._merged(pair.get("generated"), pair.get(OBSERVED))
            item = LoadedSpec(spec, installed=wanted is None or sha in wanted, popularity=spec.extra.get("popularity"))
            if wanted is not None and item.installed:
                spec.checkpoint_name = wanted[sha].name
                item.popularity = wanted[sha].popularity
                item.aliases = aliases.get(sha, [])
            loaded.items.append(item)
        return loaded

    @staticmethod
    def _installed(source: CheckpointSource | None) -> tuple[dict | None, dict[str, list[str]], list[tuple[str, str]]]:
        """({sha256: checkpoint} the source lists (None: no source), {sha256: other names of the same file},
        [(name, reason)] for the files it skipped)."""
        if source is None:
            return None, {}, []
        listing = source.list_checkpoints()
        wanted, aliases = {}, {}
        for c in listing.checkpoints:  # one file, several names: ranked once, the others listed as aliases
            if c.sha256 in wanted:
                aliases.setdefault(c.sha256, []).append(c.name)
            else:
                wanted[c.sha256] = c
        return wanted, aliases, [(s.name, s.reason) for s in listing.skipped]

    def _read_parts(self, entries: list[ManifestEntry], keep: bool, excluded: list) -> dict[str, dict[str, Spec]]:
        """{sha256: {"generated" | OBSERVED: spec}} of the usable entries (kept in memory when ``keep``); the others
        are added to ``excluded`` with their reason."""
        parts: dict[str, dict[str, Spec]] = {}
        for entry in entries:
            try:
                spec = self._load_cached(entry) if keep else self._load_listed(entry)
            except SpecError as exc:
                excluded.append((entry.checkpoint_name, str(exc)))
                continue
            if spec is None or not spec.done.any():
                excluded.append((entry.checkpoint_name, "spec has no finished prompt"))
                continue
            parts.setdefault(entry.sha256, {})[OBSERVED if entry.prompt_set_hash == OBSERVED else "generated"] = spec
        return parts

    def _merged(self, generated: Spec | None, observed: Spec | None) -> Spec:
        """merge(), cached while both parts are the same loaded objects (merging copies features)."""
        key = (id(generated), id(observed))
        sha = (generated or observed).sha256
        cached = self._merged_cache.get(sha)
        if cached is None or cached[0] != key:
            cached = (key, merge(generated, observed), (generated, observed))
            self._merged_cache[sha] = cached
        return cached[1]

    def _load_cached(self, entry: ManifestEntry) -> Spec | None:
        """A spec's features, read once per process and file version. The store lists only file versions it has
        verified (:meth:`SpecStore.scan`), so the file is checked again only if it changed since it was listed."""
        cached = self._spec_cache.get(entry.file)
        if cached is not None and cached[0] == entry.stamp:
            return cached[1]
        spec = self._load_listed(entry)
        self._spec_cache[entry.file] = (entry.stamp, spec)
        return spec

    def _load_listed(self, entry: ManifestEntry) -> Spec | None:
        try:
            st = (self.store.root / entry.file).stat()
            listed = file_stamp(st) == entry.stamp
        except OSError:
            listed = False
        return self.store.load(entry.key, verify=not listed, thumbnails=False)

    def _why_unusable(self, checkpoint: CheckpointInfo) -> str:
        try:
            return "no spec yet" if self.store.load(self.key(checkpoint.sha256)) is None else "spec not listed"
        except SpecError as exc:
            return str(exc)

    def bank(self, loaded: LoadedSpecs) -> FeatureBank:
        """The stacked features, reused (with their kernel caches) while the same specs are ranked."""
        key = (self._loaded_versions, tuple((s.sha256, s.checkpoint_name) for s in loaded.specs))
        if self._bank_cache is None or self._bank_cache[0] != key:
            self._bank_cache = None
            self._bank_cache = (key, FeatureBank.from_specs(loaded.specs, loaded.popularity))
            _return_freed_memory()
        return self._bank_cache[1]

    # -- the two-tier index (model-hub scale) -------------------------------------------------
    def indexed_entries(self, listed: list[ManifestEntry], method: str, centre: bool) -> list[ManifestEntry] | None:
        """``listed`` (this encoder's specs) when identify prefilters the complete generated ones with the index (at
        least ``limits.INDEX_MIN_SPECS`` of them), else None (every spec is ranked exactly)."""
        if method not in INDEXED_METHODS or centre:
            return None
        complete = sum(e.prompt_set_hash == self.prompt_set_hash and e.complete for e in listed)
        return listed if complete >= limits.INDEX_MIN_SPECS else None

    def index_path(self) -> Path:
        return (
            self.store.root / "index" / f"{safe_name(self.encoder_id)}--{safe_name(self.prompt_set_hash)}.safetensors"
        )

    def store_index(self, entries: list[ManifestEntry]) -> StoreIndex:
        """The index of ``entries``: held in memory, else the saved one; brought up to date with the store listing
        (and saved) when specs were added, rewritten or removed since it was built."""
        current = self._index or StoreIndex.load(self.index_path())
        index = updated_index(self.store, entries, current)
        if index is not current:
            try:
                index.save(self.index_path())
            except OSError as exc:
                log.warning("gmi: spec index not saved (%s); it is built again by the next process", exc)
        self._index = index
        return index

    def index_candidates(self, listed: list[ManifestEntry], query: Query, request: IdentifyRequest) -> Candidates:
        """The index's shortlist plus every spec it does not cover (partial and observed ones), read from their
        files; the exact ranker then orders just these."""
        index = self.store_index([e for e in listed if e.prompt_set_hash == self.prompt_set_hash and e.complete])
        n = index.prompt.shape[0]
        weights = (
            prompt_weights(index.prompt, query.text, request.tau)
            if request.method == "gmi"
            else torch.full((n,), 1.0 / n)
        )
        allowed = None
        source = request.source
        if source is not None:
            source = ListedCheckpoints(source.list_checkpoints())  # also what load reads below
            if not request.include_not_installed:
                installed = {c.sha256 for c in source.listing.checkpoints}
                allowed = torch.tensor([sha in installed for sha in index.shas])
        shortlist = set(
            index.shortlist(
                query.images, weights, min(max(INDEX_CANDIDATES, request.top_k or 0), MAX_RERANKED), allowed
            )
        )
        covered = set(index.shas)
        shortlist |= {
            e.sha256
            for e in listed
            if e.prompt_set_hash == OBSERVED or (e.prompt_set_hash == self.prompt_set_hash and e.sha256 not in covered)
        }
        for entry in listed:
            if entry.sha256 in shortlist:
                prefetch(self.store.root / entry.file)
        loaded = self.load(source, request.include_not_installed, only=shortlist, listed=listed)
        specs = loaded.specs
        if not specs:
            raise NoSpecsError(f"no installed checkpoint among the {len(index.shas)} indexed specs; build specs first")
        others = int(allowed.sum()) if allowed is not None else len(index.shas)
        others -= len(covered & {s.sha256 for s in specs})
        if others > 0:
            loaded.excluded.append(
                (f"{others} other checkpoint(s)", "not among the two-tier index's candidates for this image")
            )
        bank = FeatureBank.from_specs(specs, loaded.popularity)
        gamma = request.gamma
        if gamma is None:
            gamma = index.compact.gamma
            rows = {sha: i for i, sha in enumerate(index.shas)}
            if all(
                s.sha256 in rows
                and spec_kind(s) == "generated"
                and s.complete
                and s.images_per_prompt == bank.image.shape[2] > 1
                for s in specs
            ):  # Kbar of complete specs with >= 2 images depends on the spec alone: reuse the index's
                bank.use_kbar(gamma, index.compact.kbar[[rows[s.sha256] for s in specs]])
        return Candidates(loaded, bank, gamma)

    # -- for UIs -------------------------------------------------------------------------------
    def thumbnail(self, sha256: str, prompt_index: int, prompt_set_hash: str | None = None) -> Image.Image:
        """Row ``prompt_index`` of the stored spec ``prompt_set_hash`` (default: this library's prompt set), read
        from the spec file on demand (the ranking keeps no thumbnails in memory)."""
        if prompt_set_hash not in (None, self.prompt_set_hash, OBSERVED):
            raise GmiError(f"no spec of prompt set {prompt_set_hash!r} here")
        try:
            pixels = self.store.thumbnail(self.key(sha256, prompt_set_hash), prompt_index)
        except SpecError as exc:
            raise NoSpecsError(str(exc)) from exc
        if pixels is None:
            raise GmiError(f"spec {sha256[:10]} has no image for prompt {prompt_index}")
        return Image.fromarray(pixels, "RGB")
