"""The two-tier index the engine ranks with above ``limits.INDEX_MIN_SPECS`` specs (a model hub: 10^4 - 10^5).

For very many specs the full features (55 x 4 x 768 fp16 = 338 KB per spec) are too many bytes to read per
query. The compact tier (:class:`CompactIndex`) keeps per spec the per-prompt mean image feature, centred by
the store's per-prompt mean and projected onto the top ``r`` principal directions of the between-checkpoint
variation (N x r float32), plus Kbar at the store's median-heuristic gamma (N x N float32). The prefilter
score is the same prompt-weighted RKME with a *linear* kernel in that subspace:
``|| P^T(zbar_u - sum_i w_i mu_i) - sum_i w_i code_{m,i} ||^2``, one vector-matrix product over the index;
the top ``k`` candidates are then re-ranked with the exact Gaussian-kernel score from their full features.

:class:`StoreIndex` is that index for one store, encoder and prompt set: built from the store's complete
generated specs, saved next to them (``<store>/index/``, safetensors, no pickle) and keyed on the store
listing (file, mtime, size of every row), so added or rewritten specs are encoded into it (few) or make it
refit (many) before the next query.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .paths import atomic_write
from .ranker import kbar, kernel, median_gamma, similarities

log = logging.getLogger(__name__)

INDEX_RANK = 64  # dimension of the compact codes
INDEX_CANDIDATES = 64  # specs re-ranked exactly after the prefilter
MAX_RERANKED = 1000  # a larger top_k re-ranks at most this many (their features are read per query)
PROJECTION_SAMPLE = 2000  # specs the projection is fitted on
REFIT_FRACTION = 0.1  # more changed rows than this share of the index: fit projection and gamma again
INDEX_FORMAT = 2  # 2: rows carry the spec file's ctime
_GAMMA_SAMPLE = 1024  # rows of ranker.median_gamma's sample


# -- exact and two-tier scoring ---------------------------------------------------------------
def _self_terms(kbar_m: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """w^T Kbar_m w for every m as one matrix-vector product (einsum is ~30x slower here)."""
    w = weights.float()
    m, n, _ = kbar_m.shape
    return kbar_m.float().reshape(m, n * n) @ torch.outer(w, w).reshape(-1)


def exact_scores(
    full: torch.Tensor,
    kbar_m: torch.Tensor,
    query_images: torch.Tensor,
    weights: torch.Tensor,
    gamma: float,
    chunk: int = 2048,
) -> torch.Tensor:
    """Exact weighted RKME scores [M] of one query for complete specs (full: [M, N, S, d] fp16;
    kbar_m: [M, N, N] at ``gamma``, float32 preferred)."""
    m, n, _, d = full.shape
    out = []
    for start in range(0, m, chunk):
        block = full[start : start + chunk]
        sims = similarities(block.reshape(-1, d), query_images)  # [mb*n*s, U]
        out.append(kernel(sims, gamma).reshape(block.shape[0], n, -1).mean(-1))  # [mb, n]
    c = torch.cat(out)
    return _self_terms(kbar_m[:m], weights) - 2 * (c @ weights.float())


@dataclass
class CompactIndex:
    """The compact tier: per-spec codes and Kbar, plus the projection.

    ``codes`` is laid out [N, M * r] float32 so the prompt-weighted sum over all specs is one
    vector-matrix product (the fastest layout on CPU: fp16 and bf16 products and fp16->fp32
    conversion are several times slower here than streaming fp32).
    """

    proj: torch.Tensor  # [d, r] float32
    prompt_mean: torch.Tensor  # [N, d] float32, the store's mean of per-prompt mean features
    codes: torch.Tensor  # [N, M * r] float32
    kbar: torch.Tensor  # [M, N, N] float32, at gamma
    gamma: float

    @property
    def size(self) -> int:
        return int(self.kbar.shape[0])

    @property
    def rank(self) -> int:
        return int(self.proj.shape[1])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.proj, self.prompt_mean, self.codes, self.kbar))

    @staticmethod
    def fit_projection(prompt_means: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu [N, d], P [d, r]) from a sample of per-prompt means [m, N, d]: principal directions of
        the between-checkpoint variation (each prompt's mean over checkpoints removed first)."""
        x = prompt_means.float()
        mu = x.mean(dim=0)
        centred = (x - mu).reshape(-1, x.shape[-1])
        _, _, v = torch.linalg.svd(centred, full_matrices=False)
        return mu, v[:r].T.contiguous()

    @staticmethod
    def encode(full: torch.Tensor, mu: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
        """Codes [m, N, r] of full specs [m, N, S, d] (what a spec build adds besides Kbar)."""
        return (full.float().mean(dim=2) - mu) @ proj

    @classmethod
    def from_parts(cls, proj, mu, codes_mnr: torch.Tensor, kbar_m: torch.Tensor, gamma: float) -> CompactIndex:
        m, n, r = codes_mnr.shape
        codes = codes_mnr.float().permute(1, 0, 2).reshape(n, m * r).contiguous()
        return cls(proj, mu, codes, kbar_m.float().contiguous(), gamma)

    def prefilter_scores(self, query_images: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The linear-kernel weighted score [M] of every spec in the projected space (lower is better)."""
        w = weights.float()
        y = (query_images.float().mean(0) - w @ self.prompt_mean) @ self.proj  # [r]
        big = (w @ self.codes).reshape(self.size, self.rank)  # sum_i w_i code_{m,i}
        return ((big - y) ** 2).sum(dim=1)

    def prefilter(self, query_images: torch.Tensor, weights: torch.Tensor, k: int) -> torch.Tensor:
        """Indices of the k best specs by the prefilter score."""
        return torch.topk(self.prefilter_scores(query_images, weights), min(k, self.size), largest=False).indices

    def identify(
        self, full: torch.Tensor, query_images: torch.Tensor, weights: torch.Tensor, k: int = INDEX_CANDIDATES
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(candidate indices sorted best first, their exact scores): prefilter, then exact re-rank.

        ``full`` is [M, N, S, d] fp16, or anything indexable by a sorted index tensor that returns that
        (a memory-mapped file read per candidate)."""
        cand, _ = torch.sort(self.prefilter(query_images, weights, k))  # sorted: sequential reads of ``full``
        scores = exact_scores(full[cand].float(), self.kbar[cand], query_images, weights, self.gamma)  # few rows: fp32
        order = torch.argsort(scores, stable=True)
        return cand[order], scores[order]


# -- the index of one store ------------------------------------------------------------------
Row = tuple[str, float, int, int, str]  # (file relative to the store, mtime, size, ctime_ns, sha256): its listing


@dataclass
class StoreIndex:
    compact: CompactIndex
    prompt: torch.Tensor  # [N, d] the specs' prompt features (the ranker's weights come from these)
    rows: list[Row]

    @property
    def shas(self) -> list[str]:
        return [r[-1] for r in self.rows]

    def shortlist(
        self, query_images: torch.Tensor, weights: torch.Tensor, k: int, allowed: torch.Tensor | None = None
    ) -> list[str]:
        """sha256 of the ``k`` best rows by the prefilter, among ``allowed`` rows (bool [M]; None: all)."""
        scores = self.compact.prefilter_scores(query_images, weights)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("inf"))
            k = min(k, int(allowed.sum()))
        best = torch.topk(scores, min(k, len(scores)), largest=False).indices.tolist()
        return [self.rows[i][-1] for i in best]

    # -- persistence: safetensors with the listing in its metadata -------------------------
    def save(self, path: Path) -> None:
        c = self.compact
        tensors = {
            "proj": c.proj,
            "prompt_mean": c.prompt_mean,
            "codes": c.codes,
            "kbar": c.kbar,
            "prompt": self.prompt.float(),
        }
        meta = {"format": INDEX_FORMAT, "gamma": c.gamma, "rows": [list(r) for r in self.rows]}
        with atomic_write(path) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"gmi_index": json.dumps(meta)})

    @classmethod
    def load(cls, path: Path) -> StoreIndex | None:
        """The saved index, or None when there is none or it is unreadable or inconsistent (a derived file: rebuilt
        then, never trusted): a flipped byte, a truncated or emptied file, shapes that do not fit, non-finite values."""
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = json.loads(handle.metadata()["gmi_index"])
            if meta.get("format") != INDEX_FORMAT:
                return None
            t = load_file(str(path))
            rows = [(str(f), float(m), int(s), int(c), str(h)) for f, m, s, c, h in meta["rows"]]
            compact = CompactIndex(t["proj"], t["prompt_mean"], t["codes"], t["kbar"], float(meta["gamma"]))
            index = cls(compact, t["prompt"], rows)
            problem = index.inconsistency()
            if problem:
                raise ValueError(problem)
            return index
        except FileNotFoundError:
            return None
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type: any fault means "rebuild"
            log.warning("gmi: spec index %s unreadable (%s); rebuilding it", path.name, type(exc).__name__)
            return None

    def inconsistency(self) -> str:
        """Why these tensors cannot be this listing's index ("" when they can)."""
        c, m = self.compact, len(self.rows)
        if self.prompt.dim() != 2 or c.proj.dim() != 2 or c.kbar.dim() != 3:
            return "tensor ranks"
        n, d = self.prompt.shape
        if c.proj.shape[0] != d or tuple(c.prompt_mean.shape) != (n, d) or tuple(c.kbar.shape) != (m, n, n):
            return "tensor shapes"
        if tuple(c.codes.shape) != (n, m * c.rank) or not math.isfinite(c.gamma) or c.gamma <= 0:
            return "codes or gamma"
        if not all(bool(torch.isfinite(t).all()) for t in (c.proj, c.prompt_mean, c.codes, c.kbar, self.prompt)):
            return "non-finite values"
        return ""


def prefetch(path: Path, ranges: list[tuple[int, int]] | None = None) -> None:
    """Ask the kernel to start reading these (offset, length) byte ranges of a file (None: all of it) at once, so
    the re-rank's reads of its candidates wait on the disk in parallel instead of one after another."""
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        for offset, length in ranges or [(0, 0)]:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)


def entry_row(entry) -> Row:
    return (entry.file, *entry.stamp, entry.sha256)


def _features(store, entry) -> torch.Tensor:
    """[N, S, d] image features of a listed (already verified) spec file."""
    return store.load(entry.key, verify=False, thumbnails=False).image_features


def _gamma_of(store, entries) -> float:
    """ranker.median_gamma over the stacked features of ``entries`` (zero-padded to the most images per prompt,
    as the ranker's bank is), reading only the rows its sample picks (memory-mapped slices of the spec files),
    so the index's gamma is the exact ranker's over the same specs."""
    n, s = entries[0].prompts_total, max(e.images_per_prompt for e in entries)
    total = len(entries) * n * s
    if total <= 4 * _GAMMA_SAMPLE:
        stacked = torch.zeros(len(entries), n, s, store_dim(store, entries), dtype=torch.float16)
        for m, e in enumerate(entries):
            f = _features(store, e)
            stacked[m, :, : f.shape[1]] = f
        return median_gamma(stacked)
    picked = torch.randperm(total, generator=torch.Generator().manual_seed(0))[: 4 * _GAMMA_SAMPLE].tolist()
    rows = torch.zeros(len(picked), store_dim(store, entries), dtype=torch.float16)
    by_spec: dict[int, list[tuple[int, int]]] = {}
    for position, flat in enumerate(picked):
        by_spec.setdefault(flat // (n * s), []).append((position, flat % (n * s)))
    for m, wanted in sorted(by_spec.items()):
        with safe_open(str(store.root / entries[m].file), framework="pt") as handle:
            features = handle.get_slice("image_features")
            for position, within in wanted:
                i, j = divmod(within, s)
                if j < entries[m].images_per_prompt:  # else a padded (zero) row, as in the bank
                    rows[position] = features[i : i + 1, j : j + 1][0, 0]
    kept = rows[rows.float().norm(dim=-1) > 0][:_GAMMA_SAMPLE]  # what median_gamma keeps of its sample
    return median_gamma(kept, sample=_GAMMA_SAMPLE)


def build_index(store, entries, rank: int = INDEX_RANK) -> StoreIndex:
    """Fit projection and gamma on the specs of ``entries`` (complete, one encoder and prompt set), then encode
    every spec, reading one spec file at a time (peak memory: the index plus one spec)."""
    gamma = _gamma_of(store, entries)
    step = max(1, len(entries) // PROJECTION_SAMPLE)
    sample = [_features(store, e).float().mean(dim=1) for e in entries[::step]]
    mu, proj = CompactIndex.fit_projection(torch.stack(sample), min(rank, sample[0].shape[-1]))
    prompt = store.load(entries[0].key, verify=False, thumbnails=False).prompt_features.float()
    return _encode_rows(store, entries, mu, proj, gamma, prompt)


def _encode_rows(store, entries, mu, proj, gamma, prompt, keep: StoreIndex | None = None) -> StoreIndex:
    """The index of ``entries`` with a given projection and gamma; rows ``keep`` already holds are copied."""
    n, r = mu.shape[0], proj.shape[1]
    codes = torch.empty(len(entries), n, r)
    kbars = torch.empty(len(entries), n, n)
    old = {row: i for i, row in enumerate(keep.rows)} if keep is not None else {}
    old_codes = keep.compact.codes.reshape(n, -1, r) if keep is not None else None
    for m, entry in enumerate(entries):
        at = old.get(entry_row(entry))
        if at is not None:
            codes[m], kbars[m] = old_codes[:, at], keep.compact.kbar[at]
            continue
        full = _features(store, entry)[None]
        codes[m] = CompactIndex.encode(full, mu, proj)[0]
        kbars[m] = kbar(full, gamma)[0]
    compact = CompactIndex.from_parts(proj, mu, codes, kbars, gamma)
    return StoreIndex(compact, prompt, [entry_row(e) for e in entries])


def updated_index(store, entries, current: StoreIndex | None, rank: int = INDEX_RANK) -> StoreIndex:
    """The index for ``entries``: ``current`` as is when it was built from this very listing; with the new or
    changed specs encoded into it when they are few; built again otherwise."""
    rows = [entry_row(e) for e in entries]
    if current is not None and current.rows == rows:
        return current
    if current is not None and current.compact.proj.shape[0] == store_dim(store, entries):
        changed = len(set(rows) ^ set(current.rows))
        if changed <= REFIT_FRACTION * len(current.rows):
            c = current.compact
            return _encode_rows(store, entries, c.prompt_mean, c.proj, c.gamma, current.prompt, keep=current)
    return build_index(store, entries, rank)


def store_dim(store, entries) -> int:
    with safe_open(str(store.root / entries[0].file), framework="pt") as handle:
        return int(handle.get_slice("image_features").get_shape()[-1])
