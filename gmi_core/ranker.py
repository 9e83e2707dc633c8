"""Ranking checkpoints by (prompt-weighted) RKME distance, for all specs at once.

Notation follows DESIGN.md. With unit vectors, k(a, b) = exp(-gamma * (2 - 2 a.b)), and

    D_m = const - 2 sum_i W_mi c_mi + W_m^T Kbar_m W_m

where c_mi is the mean kernel between the query images and checkpoint m's images for prompt i,
Kbar_m the N x N matrix of mean kernels between its prompts' image sets, and W_m the prompt
weights (restricted to the prompts the spec has finished). Lower is better.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

METHODS = ("gmi", "rkme_clip", "rkme_concat", "rkme_basic", "download")
DEFAULT_METHOD = "gmi"
_CHUNK_ELEMENTS = 1 << 24  # feature values converted to float32 at a time


@dataclass
class FeatureBank:
    """Stacked features of M specs that share one encoder and one prompt set."""

    names: list[str]
    image: torch.Tensor  # [M, N, S, d]
    prompt: torch.Tensor  # [N, d]
    done: torch.Tensor  # [M, N] bool
    pixel: torch.Tensor | None = None  # [M, N, S, p]
    popularity: list[float | None] = field(default_factory=list)
    _kbar_cache: dict = field(default_factory=dict, repr=False)  # median gammas and Kbar per feature view

    @property
    def size(self) -> int:
        return int(self.image.shape[0])

    @classmethod
    def from_specs(cls, specs) -> FeatureBank:
        """Stack the specs' features; each spec is then re-pointed at its row, so features exist once."""
        if not specs:
            raise ValueError("no specs to rank")
        keys = {(s.encoder_id, s.prompt_set_hash) for s in specs}
        if len(keys) != 1:
            raise ValueError(f"specs from different encoders or prompt sets cannot be ranked together: {sorted(keys)}")
        shapes = {tuple(s.image_features.shape) for s in specs}
        if len(shapes) != 1:
            raise ValueError(f"specs differ in shape (images per prompt?): {sorted(shapes)}")
        return cls(
            names=[s.checkpoint_name for s in specs],
            image=_stack_shared(specs, "image_features"),
            prompt=specs[0].prompt_features,
            done=torch.stack([s.done for s in specs]),
            pixel=_stack_shared(specs, "pixel_features"),
            popularity=[s.extra.get("popularity") for s in specs],
        )


def _stack_shared(specs, name: str) -> torch.Tensor:
    """torch.stack without a second full copy: each spec's tensor is moved into the stack row by row."""
    first = getattr(specs[0], name)
    stacked = torch.empty((len(specs), *first.shape), dtype=first.dtype)
    for row, spec in zip(stacked, specs):
        row.copy_(getattr(spec, name))
        setattr(spec, name, row)
    return stacked


@dataclass
class Ranking:
    method: str
    gamma: float | None
    scores: torch.Tensor  # [M], lower is better
    order: torch.Tensor  # [M] indices into the bank, best first
    weights: torch.Tensor | None  # [N] prompt weights (before masking), None for `download`
    contributions: torch.Tensor | None  # [M, N] how much each prompt pulled checkpoint m towards the query

    def top_prompts(self, index: int, k: int = 3) -> list[tuple[int, float]]:
        """(prompt index, contribution) of the prompts that matched checkpoint ``index`` best."""
        if self.contributions is None:
            return []
        row = self.contributions[index]
        values, idx = torch.sort(row, descending=True)
        return [(int(i), float(v)) for i, v in zip(idx[:k], values[:k]) if v > 0]


def prompt_weights(prompt_features: torch.Tensor, query_text: torch.Tensor, tau: float | None = None) -> torch.Tensor:
    """w_i = max(cos(q_i, q_u), 0) normalised; or softmax(cos / tau) when a temperature is given."""
    cos = prompt_features.float() @ query_text.float()
    if tau is not None:
        return torch.softmax(cos / tau, dim=0)
    w = cos.clamp(min=0)
    return w / w.sum() if w.sum() > 0 else torch.full_like(w, 1.0 / len(w))


def median_gamma(features: torch.Tensor, sample: int = 1024, seed: int = 0) -> float:
    """1 / median squared distance between stored feature vectors (the median heuristic)."""
    flat = features.reshape(-1, features.shape[-1])
    if len(flat) > sample:  # sample before converting: the whole store would be slow to copy
        flat = flat[torch.randperm(len(flat), generator=torch.Generator().manual_seed(seed))[: 4 * sample]]
    flat = flat.float()
    flat = flat[flat.norm(dim=-1) > 0][:sample]  # unfinished prompts are zero rows
    d2 = (2 - 2 * flat @ flat.T).clamp(min=0)
    upper = d2[torch.triu(torch.ones_like(d2, dtype=torch.bool), diagonal=1)]
    med = float(upper[upper > 1e-9].median()) if (upper > 1e-9).any() else 1.0
    return 1.0 / med


def kernel(sim: torch.Tensor, gamma: float) -> torch.Tensor:
    return torch.exp(-gamma * (2 - 2 * sim).clamp(min=0))


def similarities(rows: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """[R, U] float32 dot products of stored rows [R, d] with query vectors [U, d].

    fp16 rows stay fp16: one matrix-vector product per query vector streams them at memory speed,
    where converting them to fp32 first costs several times more on CPUs.
    """
    if rows.dtype == torch.float32:
        return rows @ queries.float().T
    q = queries.to(rows.dtype)
    return torch.stack([rows @ q[j] for j in range(len(q))], dim=1).float()


def _query_means(image: torch.Tensor, query: torch.Tensor, gamma: float) -> torch.Tensor:
    """c[m, i] = mean over images s and queries u of k(z_u, z_{m,i,s}); chunked over m."""
    m, n, s, d = image.shape
    per_m = max(1, _CHUNK_ELEMENTS // max(1, n * s * d))
    out = []
    for start in range(0, m, per_m):
        block = similarities(image[start : start + per_m].reshape(-1, d), query)  # [(mb*n*s), n_q]
        out.append(kernel(block, gamma).reshape(-1, n, s * len(query)).mean(-1))
    return torch.cat(out)


def kbar(image: torch.Tensor, gamma: float, chunk: int = 32) -> torch.Tensor:
    """Kbar[m, i, j] = mean over s, s' of k(z_{m,i,s}, z_{m,j,s'}); precomputable per spec and gamma."""
    m, n, s, d = image.shape
    out = []
    for start in range(0, m, chunk):  # batched matrix products over a chunk of specs
        flat = image[start : start + chunk].float().reshape(-1, n * s, d)
        out.append(kernel(torch.bmm(flat, flat.transpose(1, 2)), gamma).reshape(-1, n, s, n, s).mean(dim=(2, 4)))
    return torch.cat(out) if out else torch.zeros(0, n, n)


def _weighted_scores(image, query, gamma, weights, done, kbar_m):
    """Scores [M] and contributions [M, N] for per-checkpoint prompt weights (rows renormalised)."""
    c = _query_means(image, query, gamma)
    w = weights.unsqueeze(0) * done.float()
    totals = w.sum(dim=1, keepdim=True)
    w = torch.where(totals > 0, w / totals.clamp(min=1e-12), w)
    self_term = (torch.bmm(kbar_m, w.unsqueeze(-1)).squeeze(-1) * w).sum(dim=1)  # w_m^T Kbar_m w_m; einsum is far slower
    contributions = w * c
    scores = self_term - 2 * contributions.sum(dim=1)
    scores = torch.where(totals.squeeze(1) > 0, scores, torch.full_like(scores, float("inf")))
    return scores, contributions


def rank(
    bank: FeatureBank,
    method: str = DEFAULT_METHOD,
    query_images: torch.Tensor | None = None,
    query_text: torch.Tensor | None = None,
    query_pixels: torch.Tensor | None = None,
    gamma: float | None = None,
    tau: float | None = None,
) -> Ranking:
    """Rank every checkpoint in ``bank`` for one query (one or several images)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    n_prompts = bank.prompt.shape[0]
    uniform = torch.full((n_prompts,), 1.0 / n_prompts)
    if method == "download":
        popularity = bank.popularity or [None] * bank.size
        pops = [(-(p if p is not None else float("-inf")), name.lower()) for p, name in zip(popularity, bank.names)]
        order = sorted(range(bank.size), key=lambda i: pops[i])
        scores = torch.empty(bank.size)
        scores[torch.tensor(order)] = torch.arange(bank.size, dtype=torch.float32)
        return Ranking(method, None, scores, torch.tensor(order), None, None)
    if method == "rkme_basic":
        if query_pixels is None or bank.pixel is None:
            raise ValueError("rkme_basic needs pixel features of the query and the specs")
        image, query, weights = bank.pixel, query_pixels, uniform
    else:
        if query_images is None:
            raise ValueError(f"{method} needs query image features")
        image, query = bank.image, query_images
        weights = uniform
        if method in ("gmi", "rkme_concat") and query_text is None:
            raise ValueError(f"{method} needs a query text feature (pseudo-prompt or user prompt)")
        if method == "gmi":
            weights = prompt_weights(bank.prompt, query_text, tau)
        elif method == "rkme_concat":
            image, query = concat_features(bank.image, bank.prompt, query_images, query_text)
    view = (method == "rkme_basic", method == "rkme_concat")  # which stored features are compared
    if gamma is None:
        if view not in bank._kbar_cache:
            bank._kbar_cache[view] = median_gamma(image)
        gamma = bank._kbar_cache[view]
    cache_key = (*view, round(gamma, 9))
    if cache_key not in bank._kbar_cache:
        bank._kbar_cache[cache_key] = kbar(image, gamma)
    scores, contributions = _weighted_scores(image, query, gamma, weights, bank.done, bank._kbar_cache[cache_key])
    order = torch.argsort(scores, stable=True)
    return Ranking(method, gamma, scores, order, weights, contributions)


def concat_features(image, prompt, query_images, query_text):
    """[z, q] / sqrt(2): unit vectors again, so the same kernel code applies."""
    m, n, s, d = image.shape
    q_rep = prompt.float()[None, :, None, :].expand(m, n, s, d)
    stacked = torch.cat([image.float(), q_rep], dim=-1) / 2**0.5
    query = torch.cat([query_images.float(), query_text.float().expand(len(query_images), -1)], dim=-1) / 2**0.5
    return stacked, query
