"""Prompt-conditional centring: remove from every image feature what its prompt alone predicts.

With per-spec prompts (observed specs: the user's own prompts), a checkpoint can score well only
because its prompts lie near the query's, whatever its style. Centring subtracts the library's mean
image feature at each prompt (a kernel regression over every spec's rows: weights
softmax(cos(prompt, row prompt) / tau) on the rows' mean image features), and the same mean at the
query's (pseudo-)prompt from the query; the residuals are re-normalised and ranked as usual. The
``observed`` section of ``bench synthetic`` measures it (``gmi_centred``); the ranker offers it as an
option (``rank(..., centre=True)``, CLI ``--centre``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

CENTRE_TAU = 0.05


class CentreRows(NamedTuple):
    """The rows the library's conditional mean regresses over: prompt features [R, d], mean image features [R, d] and
    weights [R] (how many specs a row stands for: the specs of one prompt set collapse into one row per prompt)."""

    prompt: torch.Tensor
    image: torch.Tensor
    weight: torch.Tensor


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def conditional_mean(rows: CentreRows, prompts: torch.Tensor, tau: float = CENTRE_TAU) -> torch.Tensor:
    """The library's mean image feature at each of ``prompts`` [..., d] (kernel regression over the rows)."""
    flat = prompts.float().reshape(-1, prompts.shape[-1])
    logits = flat @ rows.prompt.float().T / tau + rows.weight.float().log()
    out = torch.softmax(logits, dim=-1) @ rows.image.float()
    return out.reshape(*prompts.shape[:-1], rows.image.shape[-1])


def centre_library(image: torch.Tensor, prompts: torch.Tensor, mask: torch.Tensor, tau: float = CENTRE_TAU):
    """(centred image features [M, N, S, d], :class:`CentreRows`) for a library; prompts [N, d] (one prompt set) or
    [M, N, d] (per spec); ``mask`` [M, N, S] marks the rendered images. With one prompt set the M rows of a prompt
    are one row (their mean, weighted by M): the same softmax, in N x N instead of (M N)^2."""
    done, valid = mask.any(dim=2), mask.float()[..., None]
    row_means = (image.float() * valid).sum(2) / valid.sum(2).clamp(min=1)
    if prompts.ndim == 2:
        counts = done.sum(dim=0)
        held = counts > 0
        summed = (row_means * done[..., None]).sum(dim=0)[held]
        rows = CentreRows(prompts.float()[held], summed / counts[held, None], counts[held].float())
        mean = conditional_mean(rows, prompts, tau)[None]
    else:
        rows = CentreRows(prompts.float()[done], row_means[done], torch.ones(int(done.sum())))
        mean = conditional_mean(rows, prompts, tau)
    centred = _unit(image.float() - mean[:, :, None, :]) * valid
    return centred, rows


def centre_query(query: torch.Tensor, query_text: torch.Tensor, rows: CentreRows, tau: float = CENTRE_TAU):
    """Query image features [U, d] (or [T, U, d] with query_text [T, d]) minus the library's mean at the query prompt."""
    mean = conditional_mean(rows, query_text, tau)
    return _unit(query.float() - (mean[None] if query.ndim == 2 else mean[:, None, :]))
