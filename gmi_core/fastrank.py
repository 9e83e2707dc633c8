"""Fast paths for the ranker's math: many queries at once, and a two-tier index for very many specs.

Everything here computes the same quantities as :mod:`gmi_core.ranker` (the kernel, the prompt
weights, the median heuristic and Kbar are imported from it, not copied); tests assert that the
scores agree with :func:`gmi_core.ranker.rank`. Two additions:

* **batched scoring** (:func:`query_means_many`, :func:`scores_from_means`): the mean kernels of T
  queries against all specs in one matrix product, for several gammas at once, so the benchmarks
  can score thousands of tasks. ``rkme_concat`` is computed without materialising the concatenated
  [z, q] features: with unit vectors, k_gamma([z,q]/sqrt2, [z',q']/sqrt2)
  = k_{gamma/2}(z, z') * k_{gamma/2}(q, q'), so its mean kernels are image mean kernels at gamma/2
  times a per-prompt text factor (:func:`concat_means`, :func:`concat_kbar`).

* **two-tier index** (:class:`CompactIndex`): for 10^4 - 10^5 specs the full features
  (55 x 4 x 768 fp16 = 338 KB per spec) are too many bytes to scan per query. The compact tier
  keeps per spec the per-prompt mean image feature, centred by the store's per-prompt mean and
  projected onto the top ``r`` principal directions of the between-checkpoint variation (N x r
  float32), plus Kbar at the store's median-heuristic gamma (N x N float32). The prefilter score is the
  same prompt-weighted RKME with a *linear* kernel in that subspace:
  ``|| P^T(zbar_u - sum_i w_i mu_i) - sum_i w_i code_{m,i} ||^2``, one fp16 matrix-vector product
  over the index; the top ``k`` candidates are then re-ranked with the exact Gaussian-kernel score
  from their full features (in RAM or memory-mapped from disk).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .ranker import kernel, median_gamma, prompt_weights, similarities

__all__ = [
    "query_means_many",
    "scores_from_means",
    "concat_means",
    "concat_kbar",
    "rank_positions",
    "CompactIndex",
    "exact_scores",
    "median_gamma",
    "prompt_weights",
]

_CHUNK = 1 << 24  # elements of one similarity block


# -- batched scoring (benchmarks) --------------------------------------------------------------
def query_means_many(
    image: torch.Tensor, queries: torch.Tensor, gammas: list[float], prefixes: tuple[int, ...] = (1,)
) -> dict[tuple[float, int], torch.Tensor]:
    """c[(gamma, u)][t, m, i] = mean over the first u query images of task t and the S images of (m, i).

    image: [M, N, S, d]; queries: [T, U, d]. One matrix product per chunk of checkpoints, shared by
    every gamma and every prefix u <= U.
    """
    m, n, s, d = image.shape
    t, u, _ = queries.shape
    q = queries.float().reshape(t * u, d)
    per_m = max(1, _CHUNK // max(1, t * u * n * s))
    out: dict[tuple[float, int], list[torch.Tensor]] = {(g, p): [] for g in gammas for p in prefixes}
    for start in range(0, m, per_m):
        block = image[start : start + per_m].float()
        mb = block.shape[0]
        sims = (q @ block.reshape(-1, d).T).reshape(t, u, mb, n, s)
        for g in gammas:
            k = kernel(sims, g)
            for p in prefixes:
                out[(g, p)].append(k[:, :p].mean(dim=(1, 4)))
    return {key: torch.cat(parts, dim=1) for key, parts in out.items()}


def concat_means(
    image_means_half_gamma: torch.Tensor, prompt: torch.Tensor, query_text: torch.Tensor, gamma: float
) -> torch.Tensor:
    """rkme_concat mean kernels [T, M, N] from image mean kernels at gamma/2 and the text similarities."""
    text = kernel(query_text.float() @ prompt.float().T, gamma / 2)  # [T, N]
    return image_means_half_gamma * text[:, None, :]


def concat_kbar(kbar_half_gamma: torch.Tensor, prompt: torch.Tensor, gamma: float) -> torch.Tensor:
    """rkme_concat Kbar [M, N, N] from the image Kbar at gamma/2."""
    p = prompt.float()
    return kbar_half_gamma * kernel(p @ p.T, gamma / 2)[None]


def scores_from_means(means: torch.Tensor, kbar_m: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """D[t, m] = w_t^T Kbar_m w_t - 2 sum_i w_ti c[t, m, i] (lower is better), for complete specs.

    weights: [N] (shared) or [T, N] (per task).
    """
    w = weights.float()
    if w.ndim == 1:
        self_term = torch.einsum("i,mij,j->m", w, kbar_m, w)[None, :]
        cross = torch.einsum("tmi,i->tm", means, w)
    else:
        self_term = torch.einsum("ti,mij,tj->tm", w, kbar_m, w)
        cross = torch.einsum("tmi,ti->tm", means, w)
    return self_term - 2 * cross


def rank_positions(scores: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """1-based rank of checkpoint truth[t] in row t, ties broken by index as ranker's stable argsort does."""
    true_score = scores.gather(1, truth[:, None])
    idx = torch.arange(scores.shape[1])[None, :]
    better = (scores < true_score) | ((scores == true_score) & (idx < truth[:, None]))
    return better.sum(dim=1) + 1


# -- exact and two-tier scoring for many specs (bench scale) ----------------------------------
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
    m, n, s, d = full.shape
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

    def prefilter(self, query_images: torch.Tensor, weights: torch.Tensor, k: int) -> torch.Tensor:
        """Indices of the k best specs by the linear-kernel weighted score in the projected space."""
        w = weights.float()
        y = (query_images.float().mean(0) - w @ self.prompt_mean) @ self.proj  # [r]
        big = (w @ self.codes).reshape(self.size, self.rank)  # sum_i w_i code_{m,i}
        score = ((big - y) ** 2).sum(dim=1)
        return torch.topk(score, min(k, self.size), largest=False).indices

    def identify(
        self, full: torch.Tensor, query_images: torch.Tensor, weights: torch.Tensor, k: int = 64
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(candidate indices sorted best first, their exact scores): prefilter, then exact re-rank.

        ``full`` is [M, N, S, d] fp16, in RAM or a memory-mapped array wrapped by torch."""
        cand, _ = torch.sort(self.prefilter(query_images, weights, k))  # sorted: sequential reads of ``full``
        scores = exact_scores(full[cand], self.kbar[cand], query_images, weights, self.gamma)
        order = torch.argsort(scores, stable=True)
        return cand[order], scores[order]
