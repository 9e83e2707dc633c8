"""How sure a ranking is: the winner's margin over each runner-up against the estimator's own noise.

The score of spec m (see :mod:`gmi_core.ranker`) is D_m = w^T Kbar_m w - 2 sum_i w_i c_mi, an average over the
spec's images. Its first-order (Hajek) projection makes it a weighted sum of one term per image,

    D_m ~ sum_i (w_i / n_i) sum_s e_is,    e_is = 2 * (sum_j w_j kbar(z_is, prompt j) - mean_u k(z_u, z_is)),

so its variance from the finite images a spec holds is sum_i w_i^2 var_s(e_i.) / n_i (the within-prompt
variance, shrunk towards the spec's pooled one: two images per prompt give one degree of freedom). The query is
a draw too: the margin D_r - D_w as a function of the query image, f(z), is evaluated at the winner's and the
runner-up's own images (stand-ins for other images of the query's checkpoint) and its within-prompt variance,
weighted by the prompt weights, divided by the number of query images, is added. Then

    z_r = (D_r - D_w) / sqrt(var_spec(D_w) + var_spec(D_r) + var_query)

and runner-up r is a *contender* while z_r < :data:`gmi_core.limits.CONFIDENCE_Z`. Only the top
:data:`gmi_core.limits.CONFIDENCE_ROWS` rows are examined (a few batched matrix products: identify over
thousands of specs stays fast). docs/confidence.md explains the choice and its calibration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .limits import CONFIDENCE_ROWS, CONFIDENCE_Z
from .ranker import FeatureBank, Ranking, _method_view, kernel

SHRINK_DF = 2.0  # degrees of freedom of the pooled variance each prompt's own variance is shrunk towards
CONFIDENCE_METHODS = ("gmi", "rkme_clip")  # the estimators this noise model describes


@dataclass
class Confidence:
    """The separation of the examined rows (winner first): ``z`` [K] (inf for the winner), per-row ``confidence``
    and the ``contenders`` (bank indices, winner first) that cannot be told apart from the winner."""

    rows: list[int]  # bank indices examined, best first
    z: list[float]
    confidence: list[float]
    contenders: list[int] = field(default_factory=list)

    @property
    def ambiguous(self) -> bool:
        return len(self.contenders) > 1

    def of(self, index: int) -> float | None:
        """Row ``index``'s confidence (None: not examined, it is far behind)."""
        try:
            return self.confidence[self.rows.index(index)]
        except ValueError:
            return None


def _normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def _within_prompt_variance(values: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(variance [..., N] of ``values`` [..., N, S] over each prompt's valid images, shrunk towards the pooled
    within-prompt variance of the last-but-one axis, and the image counts n [..., N])."""
    v = valid.float()
    n = v.sum(-1)
    mean = (values * v).sum(-1) / n.clamp(min=1)
    sq = (((values - mean[..., None]) ** 2) * v).sum(-1)
    df = (n - 1).clamp(min=0)
    pooled_df = df.sum(-1, keepdim=True)
    pooled = sq.sum(-1, keepdim=True) / pooled_df.clamp(min=1)
    # no prompt with two images: the spread between prompts stands in (larger, so the answer errs to "unsure")
    between = (
        ((mean - (mean * (n > 0)).sum(-1, keepdim=True) / (n > 0).sum(-1, keepdim=True).clamp(min=1)) ** 2) * (n > 0)
    ).sum(-1, keepdim=True) / ((n > 0).sum(-1, keepdim=True) - 1).clamp(min=1)
    pooled = torch.where(pooled_df > 0, pooled, between)
    return (sq + SHRINK_DF * pooled) / (df + SHRINK_DF), n


def separation(
    image: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor, query: torch.Tensor, gamma: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(margin D_r - D_w, its standard error, z) [B, K] for B rankings of K rows each, winner at row 0.

    image [B, K, N, S, d], mask [B, K, N, S], weights [B, K, N] (each row's prompt weights, zero where the spec
    has no image, summing to 1), query [B, U, d].
    """
    b, k, n, s, d = image.shape
    flat = image.float().reshape(b * k, n * s, d)
    valid = mask.reshape(b * k, n * s).float()
    w = weights.float().reshape(b * k, n)
    q = query.float()
    u = q.shape[1]
    a = kernel(torch.bmm(flat.reshape(b, k * n * s, d), q.transpose(1, 2)), gamma).mean(-1).reshape(b * k, n * s)

    def prompt_means(gram: torch.Tensor, cols: torch.Tensor, exclude_self: bool) -> torch.Tensor:
        """[R, n*s, n]: mean kernel of each row image with each prompt's valid column images."""
        pairs = cols[:, None, :].expand_as(gram).clone()
        if exclude_self:
            pairs.diagonal(dim1=1, dim2=2).zero_()
        sums = (gram * pairs).reshape(gram.shape[0], n * s, n, s).sum(-1)
        counts = pairs.reshape(gram.shape[0], n * s, n, s).sum(-1)
        fill = (sums.sum(-1) / counts.sum(-1).clamp(min=1))[..., None]  # a prompt with no other image
        return torch.where(counts > 0, sums / counts.clamp(min=1), fill.expand_as(sums))

    own = prompt_means(kernel(torch.bmm(flat, flat.transpose(1, 2)), gamma), valid, True)  # [B*K, n*s, n]
    g = (own * w[:, None, :]).sum(-1)
    e = 2 * (g - a)  # per-image influence on D
    var_e, counts = _within_prompt_variance(e.reshape(b * k, n, s), mask.reshape(b * k, n, s))
    var_spec = (w**2 * var_e / counts.clamp(min=1) * (counts > 0)).sum(-1).reshape(b, k)

    # scores from the same quantities (the ranker's, up to the Kbar fill of prompts with one image)
    c = (a.reshape(b * k, n, s) * mask.reshape(b * k, n, s)).sum(-1) / counts.clamp(min=1)
    kbar_w = (own * valid[:, :, None]).reshape(b * k, n, s, n).sum(2) / counts.clamp(min=1)[:, :, None]
    score = ((kbar_w * w[:, :, None] * w[:, None, :]).sum((1, 2)) - 2 * (w * c).sum(-1)).reshape(b, k)
    margin = score - score[:, :1]

    # the query's own noise: f(z) = 2 sum_i w0_i a0_i(z) - 2 sum_i wr_i ar_i(z) at both specs' images
    images = flat.reshape(b, k, n * s, d)
    winner, rest = images[:, 0], images[:, 1:]
    w0, wr = w.reshape(b, k, n)[:, :1], w.reshape(b, k, n)[:, 1:]
    v0, vr = valid.reshape(b, k, n * s)[:, :1], valid.reshape(b, k, n * s)[:, 1:]
    cross = kernel(torch.einsum("bxd,bkyd->bkxy", winner, rest), gamma)  # [B, K-1, n*s (winner), n*s (runner-up)]
    cross_flat = cross.reshape(-1, n * s, n * s)
    at_winner = prompt_means(cross_flat, vr.reshape(-1, n * s), False).reshape(b, k - 1, n * s, n)
    at_rest = prompt_means(cross_flat.transpose(1, 2), v0.expand(-1, k - 1, -1).reshape(-1, n * s), False)
    at_rest = at_rest.reshape(b, k - 1, n * s, n)
    own_b = own.reshape(b, k, n * s, n)
    f_winner = 2 * (own_b[:, :1] * w0[:, :, None, :]).sum(-1) - 2 * (at_winner * wr[:, :, None, :]).sum(-1)
    f_rest = 2 * (at_rest * w0[:, :, None, :]).sum(-1) - 2 * (own_b[:, 1:] * wr[:, :, None, :]).sum(-1)
    m0 = mask.reshape(b, k, n, s)[:, :1].expand(-1, k - 1, -1, -1)
    mr = mask.reshape(b, k, n, s)[:, 1:]
    var_f0, _ = _within_prompt_variance(f_winner.reshape(b, k - 1, n, s), m0)
    var_fr, _ = _within_prompt_variance(f_rest.reshape(b, k - 1, n, s), mr)
    var_query = 0.5 * ((var_f0 * w0).sum(-1) + (var_fr * wr).sum(-1)) / u

    se = torch.zeros(b, k)
    se[:, 1:] = (var_spec[:, :1] + var_spec[:, 1:] + var_query).clamp(min=1e-12).sqrt()
    z = torch.full((b, k), float("inf"))
    z[:, 1:] = margin[:, 1:] / se[:, 1:]
    return margin, se, z


def confidences(z: torch.Tensor) -> torch.Tensor:
    """Per row [.., K]: the winner's chance (normal approximation) to beat every examined runner-up, and each
    runner-up's chance to beat the winner."""
    p_worse = _normal_cdf(z[..., 1:])
    return torch.cat([p_worse.prod(-1, keepdim=True), 1 - p_worse], dim=-1)


def contender_mask(z: torch.Tensor, threshold: float = CONFIDENCE_Z) -> torch.Tensor:
    """[.., K] bool: the winner and every runner-up whose margin is below ``threshold`` standard errors."""
    flagged = z < threshold
    flagged[..., 0] = True
    return flagged


def normalised_weights(weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The ranker's prompt weights [M, N] as it applies them: zero on prompts a spec lacks, each row summing to 1."""
    w = (weights if weights.ndim == 2 else weights[None].expand(mask.shape[0], -1)) * mask.any(-1).float()
    return w / w.sum(-1, keepdim=True).clamp(min=1e-12)


def ranking_confidence(
    bank: FeatureBank,
    ranking: Ranking,
    query_images: torch.Tensor,
    query_text: torch.Tensor | None,
    query_pixels: torch.Tensor | None = None,
    centre: bool = False,
    rows: int = CONFIDENCE_ROWS,
    threshold: float = CONFIDENCE_Z,
) -> Confidence | None:
    """The confidence of ``ranking`` (None for methods this noise model does not describe, or one row)."""
    if ranking.method not in CONFIDENCE_METHODS or bank.size < 2 or ranking.gamma is None:
        return None
    image, query, weights = _method_view(bank, ranking.method, query_images, query_text, query_pixels, None, centre)
    if ranking.weights is not None:
        weights = ranking.weights  # what the ranking used (temperature included)
    order = [i for i in ranking.order.tolist() if math.isfinite(float(ranking.scores[i]))][:rows]
    if len(order) < 2:
        return None
    idx = torch.tensor(order)
    mask = bank.mask[idx]
    w = normalised_weights(weights[idx] if weights.ndim == 2 else weights, mask)
    _, _, z = separation(image[idx][None], mask[None], w[None], query.float()[None], ranking.gamma)
    z = z[0]
    conf = confidences(z)
    flagged = contender_mask(z, threshold)
    contenders = [order[j] for j in range(len(order)) if bool(flagged[j])]
    return Confidence(order, [float(x) for x in z], [round(float(x), 4) for x in conf], contenders)
