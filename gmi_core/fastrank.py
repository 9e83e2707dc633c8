"""Fast paths for the ranker's math: many queries at once (the benchmarks).

Everything here computes the same quantities as :mod:`gmi_core.ranker` (the kernel, the prompt
weights, the median heuristic and Kbar are imported from it, not copied); tests assert that the
scores agree with :func:`gmi_core.ranker.rank`.

* **batched scoring** (:func:`query_means_many`, :func:`scores_from_means`): the mean kernels of T
  queries against all specs in one matrix product, for several gammas at once, so the benchmarks
  can score thousands of tasks. ``rkme_concat`` is computed without materialising the concatenated
  [z, q] features: with unit vectors, k_gamma([z,q]/sqrt2, [z',q']/sqrt2)
  = k_{gamma/2}(z, z') * k_{gamma/2}(q, q'), so its mean kernels are image mean kernels at gamma/2
  times a per-prompt text factor (:func:`concat_means`, :func:`concat_kbar`).

The two-tier index for very many specs (and its exact scoring) is :mod:`gmi_core.index`.
"""

from __future__ import annotations

import torch

from .ranker import kernel, median_gamma, prompt_weights

__all__ = [
    "concat_kbar",
    "concat_means",
    "median_gamma",
    "prompt_weights",
    "query_means_many",
    "rank_positions",
    "scores_from_means",
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
