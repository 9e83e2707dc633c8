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

import torch

CENTRE_TAU = 0.05


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def conditional_mean(
    rows_prompt: torch.Tensor, rows_image: torch.Tensor, prompts: torch.Tensor, tau: float = CENTRE_TAU
):
    """The library's mean image feature at each of ``prompts`` [..., d] (kernel regression over the rows)."""
    flat = prompts.float().reshape(-1, prompts.shape[-1])
    out = torch.softmax(flat @ rows_prompt.float().T / tau, dim=-1) @ rows_image.float()
    return out.reshape(*prompts.shape[:-1], rows_image.shape[-1])


def centre_library(image: torch.Tensor, prompts: torch.Tensor, mask: torch.Tensor, tau: float = CENTRE_TAU):
    """(centred image features [M, N, S, d], rows_prompt, rows_image) for a library; prompts [N, d] or [M, N, d];
    ``mask`` [M, N, S] marks the rendered images."""
    per_spec = prompts if prompts.ndim == 3 else prompts.expand(image.shape[0], -1, -1)
    done, valid = mask.any(dim=2), mask.float()[..., None]
    row_means = (image.float() * valid).sum(2) / valid.sum(2).clamp(min=1)
    rows_prompt, rows_image = per_spec.float()[done], row_means[done]
    mean = conditional_mean(rows_prompt, rows_image, per_spec, tau)
    centred = _unit(image.float() - mean[:, :, None, :]) * valid
    return centred, rows_prompt, rows_image


def centre_query(query: torch.Tensor, query_text: torch.Tensor, rows_prompt, rows_image, tau: float = CENTRE_TAU):
    """Query image features [U, d] (or [T, U, d] with query_text [T, d]) minus the library's mean at the query prompt."""
    mean = conditional_mean(rows_prompt, rows_image, query_text, tau)
    return _unit(query.float() - (mean[None] if query.ndim == 2 else mean[:, None, :]))
