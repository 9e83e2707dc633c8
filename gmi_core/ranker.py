"""Ranking checkpoints by (prompt-weighted) RKME distance, for all specs at once.

Notation follows docs/how-it-works.md. With unit vectors, k(a, b) = exp(-gamma * (2 - 2 a.b)), and

    D_m = const - 2 sum_i W_mi c_mi + W_m^T Kbar_m W_m

where c_mi is the mean kernel between the query images and checkpoint m's images for prompt i,
Kbar_m the N x N matrix of mean kernels between its prompts' image sets, and W_m the prompt
weights (restricted to the prompts the spec has finished). Lower is better.

Specs may hold different numbers of images per prompt (budgets, partial builds): the bank pads them
to the largest S and carries a per-image mask, c and Kbar are masked means, and Kbar's diagonal
(two images of one prompt) leaves out each image's kernel with itself, so that a spec with one
image per prompt is not penalised for it; where a spec has a single image of a prompt, that entry
is the bank's mean for the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

METHODS = ("gmi", "rkme_clip", "rkme_concat", "rkme_basic", "download")
DEFAULT_METHOD = "gmi"
_CHUNK_ELEMENTS = 1 << 24  # feature values converted to float32 at a time
PLAIN_VIEW = (False, False, False)  # (pixels, concatenated with prompts, centred): CLIP image features as built


def _kbar_key(view: tuple, gamma: float) -> tuple:
    """The bank's cache key of Kbar for one feature view and kernel width."""
    return (*view, round(gamma, 9))


@dataclass
class FeatureBank:
    """Stacked features of M specs of one encoder.

    Specs that share one prompt set keep one prompt tensor [N, d]. Specs with their own prompts
    (observed specs, mixed specs) are padded to [M, N_max, d]: padded rows have ``done`` False and
    zero features, and each spec's prompt weights come from its own prompts (see :func:`rank`).
    """

    names: list[str]
    image: torch.Tensor  # [M, N, S, d]
    prompt: torch.Tensor  # [N, d] shared, or [M, N, d] per spec
    done: torch.Tensor  # [M, N] bool
    pixel: torch.Tensor | None = None  # [M, N, S, p]
    popularity: list[float | None] = field(default_factory=list)
    image_mask: torch.Tensor | None = None  # [M, N, S] bool: rendered images; None = every image of a done prompt
    _kbar_cache: dict = field(default_factory=dict, repr=False)  # median gammas and Kbar per feature view

    @property
    def size(self) -> int:
        return int(self.image.shape[0])

    @property
    def mask(self) -> torch.Tensor:
        if self.image_mask is not None:
            return self.image_mask
        return self.done[:, :, None].expand(self.image.shape[:3])

    def use_kbar(self, gamma: float, kbar_matrix: torch.Tensor) -> None:
        """Rank the plain CLIP image view (gmi, rkme_clip, not centred) at ``gamma`` with a Kbar computed elsewhere
        (the two-tier index keeps each complete spec's): :func:`rank` then skips computing it."""
        self._kbar_cache[_kbar_key(PLAIN_VIEW, gamma)] = kbar_matrix

    @classmethod
    def from_specs(cls, specs, popularity: list[float | None] | None = None) -> FeatureBank:
        """Specs padded to the most prompts and images per prompt (padded entries are masked off); each spec is
        then re-pointed at its row of the bank, so its features exist once. ``popularity``: per spec (the
        ``download`` baseline's order; default: what each spec file stored)."""
        if not specs:
            raise ValueError("no specs to rank")
        keys = {(s.encoder_id, s.prompt_set_hash) for s in specs}
        if len({encoder for encoder, _ in keys}) != 1:
            raise ValueError(f"specs from different encoders cannot be ranked together: {sorted(keys)}")
        n_max = max(s.n_prompts for s in specs)
        s_max = max(s.images_per_prompt for s in specs)

        def padded(t: torch.Tensor) -> torch.Tensor:
            if tuple(t.shape[:2]) == (n_max, s_max):
                return t
            out = t.new_zeros((n_max, s_max, *t.shape[2:]))
            out[: t.shape[0], : t.shape[1]] = t
            return out

        def padded_rows(t: torch.Tensor) -> torch.Tensor:
            out = t.new_zeros((n_max, *t.shape[1:]))
            out[: len(t)] = t
            return out

        mask = torch.stack([padded(s.image_done) for s in specs])
        shared = len(keys) == 1
        return cls(
            names=[s.checkpoint_name for s in specs],
            image=_stack_shared(specs, "image_features", n_max, s_max),
            prompt=specs[0].prompt_features if shared else torch.stack([padded_rows(s.prompt_features) for s in specs]),
            done=mask.any(dim=2),
            pixel=_stack_shared(specs, "pixel_features", n_max, s_max),
            popularity=list(popularity) if popularity is not None else [s.extra.get("popularity") for s in specs],
            image_mask=mask,
        )


def _stack_shared(specs, name: str, n_max: int, s_max: int) -> torch.Tensor:
    """torch.stack (zero-padded to [n_max, s_max]) without a second full copy: each spec's tensor is moved into
    the stack row by row and the spec keeps a view of its row."""
    first = getattr(specs[0], name)
    stacked = torch.zeros((len(specs), n_max, s_max, *first.shape[2:]), dtype=first.dtype)
    for row, spec in zip(stacked, specs):
        own = getattr(spec, name)
        n, s = own.shape[:2]
        row[:n, :s].copy_(own)
        setattr(spec, name, row[:n, :s])
    return stacked


@dataclass
class Ranking:
    method: str
    gamma: float | None
    scores: torch.Tensor  # [M], lower is better
    order: torch.Tensor  # [M] indices into the bank, best first
    weights: torch.Tensor | None  # [N] or [M, N] prompt weights (before masking), None for `download`
    contributions: torch.Tensor | None  # [M, N] how much each prompt pulled checkpoint m towards the query
    _top: tuple | None = field(default=None, repr=False, compare=False)  # (k, values, indices) of top_prompts

    def weight(self, index: int, prompt: int) -> float:
        """Prompt ``prompt``'s weight for checkpoint ``index`` (shared or per-spec weights)."""
        if self.weights is None:
            return 0.0
        return float(self.weights[index, prompt] if self.weights.ndim == 2 else self.weights[prompt])

    def top_prompts(self, index: int, k: int = 3) -> list[tuple[int, float]]:
        """(prompt index, contribution) of the prompts that matched checkpoint ``index`` best."""
        if self.contributions is None:
            return []
        if self._top is None or self._top[0] < k:  # one top-k over all checkpoints, not a sort per result row
            values, idx = torch.topk(self.contributions, min(k, self.contributions.shape[1]), dim=1)
            self._top = (k, values.tolist(), idx.tolist())
        _, values, idx = self._top
        return [(i, v) for i, v in zip(idx[index][:k], values[index][:k]) if v > 0]


def prompt_weights(prompt_features: torch.Tensor, query_text: torch.Tensor, tau: float | None = None) -> torch.Tensor:
    """w_i = max(cos(q_i, q_u), 0) normalised; or softmax(cos / tau) when a temperature is given.

    prompt_features [N, d] gives [N]; per-spec prompts [M, N, d] give [M, N], each row normalised.
    """
    cos = prompt_features.float() @ query_text.float()
    if tau is not None:
        return torch.softmax(cos / tau, dim=-1)
    w = cos.clamp(min=0)
    totals = w.sum(dim=-1, keepdim=True)
    return torch.where(totals > 0, w / totals.clamp(min=1e-12), torch.full_like(w, 1.0 / w.shape[-1]))


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


def _query_means(image: torch.Tensor, query: torch.Tensor, gamma: float, mask: torch.Tensor) -> torch.Tensor:
    """c[m, i] = mean over rendered images s and queries u of k(z_u, z_{m,i,s}); chunked over m."""
    m, n, s, d = image.shape
    per_m = max(1, _CHUNK_ELEMENTS // max(1, n * s * d))
    out = []
    for start in range(0, m, per_m):
        block = similarities(image[start : start + per_m].reshape(-1, d), query)  # [(mb*n*s), n_q]
        k = kernel(block, gamma).reshape(-1, n, s, len(query)).mean(-1)
        valid = mask[start : start + per_m].float()
        out.append((k * valid).sum(-1) / valid.sum(-1).clamp(min=1))
    return torch.cat(out)


def kbar(
    image: torch.Tensor, gamma: float, mask: torch.Tensor | None = None, chunk: int = 32, per_prompt_fill: bool = True
) -> torch.Tensor:
    """Kbar[m, i, j] = masked mean over image pairs (s, s') of k(z_{m,i,s}, z_{m,j,s'}), no image with itself.

    Entries without a pair (unrendered prompts; the diagonal of a prompt with one image) take the mean of
    that diagonal entry over the specs that have one (``per_prompt_fill``: the specs share one prompt set),
    else the mean of every known diagonal entry, else 1 (every spec has one image per prompt: then the
    kernel of an image with itself is the same for all and keeps the ranking fair).
    """
    m, n, s, d = image.shape
    mask = torch.ones(m, n, s, dtype=torch.bool) if mask is None else mask
    out = []
    eye = torch.eye(n * s, dtype=torch.bool)
    for start in range(0, m, chunk):  # batched matrix products over a chunk of specs
        flat = image[start : start + chunk].float().reshape(-1, n * s, d)
        valid = mask[start : start + chunk].reshape(-1, n * s).float()
        pairs = (valid[:, :, None] * valid[:, None, :]).masked_fill(eye, 0)
        k = kernel(torch.bmm(flat, flat.transpose(1, 2)), gamma) * pairs
        sums = k.reshape(-1, n, s, n, s).sum(dim=(2, 4))
        counts = pairs.reshape(-1, n, s, n, s).sum(dim=(2, 4))
        out.append(torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, float("nan"))))
    if not out:
        return torch.zeros(0, n, n)
    result = torch.cat(out)
    diagonal = torch.diagonal(result, dim1=1, dim2=2)  # [M, N], a view
    known = ~torch.isnan(diagonal)
    per_prompt = torch.where(known, diagonal, 0).sum(0) / known.sum(0).clamp(min=1)
    overall = float(diagonal[known].mean()) if known.any() else 1.0
    fill = torch.where(known.any(0) & per_prompt_fill, per_prompt, torch.full_like(per_prompt, overall))
    diagonal.copy_(torch.where(known, diagonal, fill.expand_as(diagonal)))
    return torch.nan_to_num(result, nan=0.0)  # pairs with an unrendered prompt carry zero weight


def _weighted_scores(image, query, gamma, weights, mask, kbar_m):
    """Scores [M] and contributions [M, N] for per-checkpoint prompt weights (rows renormalised)."""
    c = _query_means(image, query, gamma, mask)
    w = (weights if weights.ndim == 2 else weights.unsqueeze(0)) * mask.any(dim=2).float()
    totals = w.sum(dim=1, keepdim=True)
    w = torch.where(totals > 0, w / totals.clamp(min=1e-12), w)
    self_term = (torch.bmm(kbar_m, w.unsqueeze(-1)).squeeze(-1) * w).sum(
        dim=1
    )  # w_m^T Kbar_m w_m; einsum is far slower
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
    centre: bool = False,
) -> Ranking:
    """Rank every checkpoint in ``bank`` for one query (one or several images).

    ``centre``: gmi / rkme_clip on prompt-conditionally centred features (:mod:`gmi_core.centring`).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "download":
        return _by_popularity(bank)
    image, query, weights = _method_view(bank, method, query_images, query_text, query_pixels, tau, centre)
    view = (method == "rkme_basic", method == "rkme_concat", centre and method in ("gmi", "rkme_clip"))
    if gamma is None:
        if view not in bank._kbar_cache:
            bank._kbar_cache[view] = median_gamma(image)
        gamma = bank._kbar_cache[view]
    cache_key = _kbar_key(view, gamma)
    if cache_key not in bank._kbar_cache:
        bank._kbar_cache[cache_key] = kbar(image, gamma, bank.mask, per_prompt_fill=bank.prompt.ndim == 2)
    scores, contributions = _weighted_scores(image, query, gamma, weights, bank.mask, bank._kbar_cache[cache_key])
    order = torch.argsort(scores, stable=True)
    return Ranking(method, gamma, scores, order, weights, contributions)


def _by_popularity(bank: FeatureBank) -> Ranking:
    """The ``download`` baseline: most popular first, ties by name."""
    popularity = bank.popularity or [None] * bank.size
    pops = [(-(p if p is not None else float("-inf")), name.lower()) for p, name in zip(popularity, bank.names)]
    order = sorted(range(bank.size), key=lambda i: pops[i])
    scores = torch.empty(bank.size)
    scores[torch.tensor(order)] = torch.arange(bank.size, dtype=torch.float32)
    return Ranking("download", None, scores, torch.tensor(order), None, None)


def _method_view(bank: FeatureBank, method, query_images, query_text, query_pixels, tau, centre):
    """(library features, query features, prompt weights) that ``method`` compares."""
    n_prompts = bank.prompt.shape[-2]
    uniform = torch.full((n_prompts,), 1.0 / n_prompts)
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
        if centre and method in ("gmi", "rkme_clip"):
            image, query = _centred(bank, query_images, query_text)
    return image, query, weights


def _centred(bank: FeatureBank, query_images: torch.Tensor, query_text: torch.Tensor | None):
    from .centring import centre_library, centre_query

    if query_text is None:
        raise ValueError("centring needs a query text feature (pseudo-prompt or user prompt)")
    if "centred" not in bank._kbar_cache:
        bank._kbar_cache["centred"] = centre_library(bank.image, bank.prompt, bank.mask)
    image, rows = bank._kbar_cache["centred"]
    return image, centre_query(query_images, query_text, rows)


def concat_features(image, prompt, query_images, query_text):
    """[z, q] / sqrt(2): unit vectors again, so the same kernel code applies."""
    m, n, s, d = image.shape
    per_spec = prompt.float() if prompt.ndim == 3 else prompt.float()[None]
    q_rep = per_spec[:, :, None, :].expand(m, n, s, d)
    stacked = torch.cat([image.float(), q_rep], dim=-1) / 2**0.5
    query = torch.cat([query_images.float(), query_text.float().expand(len(query_images), -1)], dim=-1) / 2**0.5
    return stacked, query
