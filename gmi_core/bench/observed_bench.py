"""``bench synthetic`` sections for specs without generating (JSON keys ``observed``, ``exchange``, ``library_map``).

* observed: each checkpoint's spec is either *generated* (the 55 platform prompts x 4 images) or
  *observed* (K images, one per prompt, the prompts drawn at random per checkpoint from the
  evaluation distribution, as a user's own renders are); queries are held-out evaluation prompts.
  Libraries: all generated, all observed (K = 8 .. 64), and half/half (kinds mixed in one ranking).
  Methods: gmi, rkme_clip, and gmi_centred (gmi on prompt-conditionally centred features, gmi_core/centring.py).
* exchange: ranking with specs after the exchange format's int8 / int4 encoding against the fp16 originals.
* library_map: relative prompt-aligned distances of near-duplicates (one lineage) against distinct
  checkpoints in the near-duplicate family; the threshold gmi uses must fall between them.
"""

from __future__ import annotations

import math

import torch

from ..centring import centre_library, centre_query
from ..exchange import dequantise, quantise
from ..fastrank import query_means_many, rank_positions
from ..library_map import NEAR_DUPLICATE_THRESHOLD, distances
from ..prompts import DEFAULT_PROMPT_SET
from ..protocols import GenerationSettings
from ..ranker import kbar, median_gamma, prompt_weights
from ..spec import Spec

OBSERVED_SIZES = (8, 16, 32, 64)
QUERY_SIZES = (1, 4)


def _metrics(positions: torch.Tensor) -> dict:
    p = positions.float()
    return {
        "top1": round(float((p <= 1).float().mean()), 4),
        "top3": round(float((p <= 3).float().mean()), 4),
        "mean_rank": round(float(p.mean()), 4),
        "n_tasks": len(p),
    }


def _scores(image, prompts, rendered, q_img, q_text, gamma, weighted: bool, u: int):
    """Weighted RKME scores [T, M] for per-spec prompts (image [M, N, S, d], prompts [M, N, d]); ``rendered``
    [M, N, S] marks the distinct images (an observed row's copies are not pairs of two images, as in the engine)."""
    done = rendered.any(dim=2)
    means = query_means_many(image, q_img, [gamma], (u,))[(gamma, u)]  # [T, M, N]
    kb = kbar(image, gamma, rendered)  # [M, N, N]
    w = torch.stack([prompt_weights(prompts, q) for q in q_text]) if weighted else torch.ones(len(q_text), *done.shape)
    w = w * done.float()[None]
    w = w / w.sum(-1, keepdim=True).clamp(min=1e-12)
    self_term = torch.einsum("tmi,mij,tmj->tm", w, kb, w)
    return self_term - 2 * (means * w).sum(-1)


def _library(world, platform, kinds: list[int], seed: int):
    """(image [M, N, S, d], prompts [M, N, d], rendered [M, N, S]) with kinds[m] = 0 (generated) or K (observed
    images). An observed row holds one image, repeated to S so that means over S need no mask; ``rendered`` marks
    only the first copy."""
    cfg = world.cfg
    m = len(kinds)
    n_max = max([cfg.n_platform if k == 0 else k for k in kinds])
    s = cfg.images_per_prompt
    image = torch.zeros(m, n_max, s, cfg.d)
    prompts = torch.zeros(m, n_max, cfg.d)
    rendered = torch.zeros(m, n_max, s, dtype=torch.bool)
    platform_text = world.text(platform)
    for i, k in enumerate(kinds):
        if k == 0:
            z, _ = world.render(torch.tensor([i]), platform, s, pixels=False)
            image[i, : cfg.n_platform] = z[0]
            prompts[i, : cfg.n_platform] = platform_text
            rendered[i, : cfg.n_platform] = True
        else:
            contents = world.contents(world.topics, k)  # the user's own prompts: the evaluation distribution
            z, _ = world.render(torch.tensor([i]), contents, 1, pixels=False)
            image[i, :k] = z[0].expand(-1, s, -1)  # one image per prompt, repeated to S (scores unchanged)
            prompts[i, :k] = world.text(contents)
            rendered[i, :k, 0] = True
    return image, prompts, rendered


def observed_vs_generated(
    cfg, seed: int, families=("a_easy", "e_subtle_x16", "e_subtle_x64"), tasks_per_ckpt: int = 12
) -> dict:
    from .simulation import make_family

    out = {}
    for fam_index, family in enumerate(families):
        world, platform, evaluation = make_family(family, cfg, seed + 97 * fam_index, 16)
        m = len(world.styles)
        truth = torch.arange(m).repeat_interleave(tasks_per_ckpt)
        eval_ids = torch.randint(len(evaluation), (len(truth),), generator=world.gen)
        q_img = world.render(truth, evaluation[eval_ids][:, None, :], max(QUERY_SIZES), pixels=False)[0][:, 0]
        q_text = world.pseudo_prompt(world.text(evaluation[eval_ids]))
        libraries = {"generated": [0] * m}
        libraries.update({f"observed_{k}": [k] * m for k in OBSERVED_SIZES})
        libraries["half_generated_half_observed_16"] = [0 if i % 2 == 0 else 16 for i in range(m)]
        rows = {}
        for label, kinds in libraries.items():
            image, prompts, rendered = _library(world, platform, kinds, seed)
            done = rendered.any(dim=2)
            gamma = median_gamma(image[done])
            row = {}
            c_image, centre_rows = centre_library(image, prompts, done[:, :, None].expand(rendered.shape))
            c_query = centre_query(q_img, q_text, centre_rows)
            c_gamma = median_gamma(c_image[done])
            for method, weighted in (("gmi", True), ("rkme_clip", False), ("gmi_centred", True)):
                for u in QUERY_SIZES:
                    if method == "gmi_centred":
                        scores = _scores(c_image, prompts, rendered, c_query, q_text, c_gamma, True, u)
                    else:
                        scores = _scores(image, prompts, rendered, q_img, q_text, gamma, weighted, u)
                    pos = rank_positions(scores, truth)
                    row.setdefault(method, {})[str(u)] = _metrics(pos)
                    if label.startswith("half"):
                        kind = torch.tensor(kinds)[truth] > 0
                        row[method][str(u)]["observed_queries"] = _metrics(pos[kind])
                        row[method][str(u)]["generated_queries"] = _metrics(pos[~kind])
            rows[label] = row
        out[family] = rows
    return out


def exchange_quantisation(
    cfg, seed: int, families=("a_easy", "e_subtle_x16", "e_subtle_x64"), tasks: int = 192
) -> dict:
    from .simulation import make_family

    out = {}
    for fam_index, family in enumerate(families):
        world, platform, evaluation = make_family(family, cfg, seed + 31 * fam_index, 16)
        m = len(world.styles)
        image, prompts, rendered = _library(world, platform, [0] * m, seed)
        packed = dequantise(*quantise(image.half(), 127)).float()
        truth = torch.arange(m).repeat(math.ceil(tasks / m))[:tasks]
        eval_ids = torch.randint(len(evaluation), (len(truth),), generator=world.gen)
        q_img = world.render(truth, evaluation[eval_ids][:, None, :], max(QUERY_SIZES), pixels=False)[0][:, 0]
        q_text = world.pseudo_prompt(world.text(evaluation[eval_ids]))
        gamma = median_gamma(image)
        row = {}
        for label, feats in (("fp16", image), ("int8_exchange", packed)):
            for u in QUERY_SIZES:
                scores = _scores(feats, prompts, rendered, q_img, q_text, gamma, True, u)
                row.setdefault(label, {})[str(u)] = _metrics(rank_positions(scores, truth))
                row[label][str(u)]["scores"] = scores
        for u in QUERY_SIZES:
            a, b = row["fp16"][str(u)].pop("scores"), row["int8_exchange"][str(u)].pop("scores")
            row.setdefault("agreement", {})[str(u)] = {
                "same_top1": round(float((a.argmin(1) == b.argmin(1)).float().mean()), 4),
                "max_abs_score_change": float((a - b).abs().max()),
            }
        out[family] = row
    out["max_abs_feature_error"] = float((packed - image).abs().max())
    return out


def library_map_threshold(cfg, seed: int) -> dict:
    from .simulation import make_family

    world, platform, _ = make_family("b_near_duplicates", cfg, seed, 16)
    m = len(world.styles)
    text = world.text(platform).half()
    z, _ = world.render(torch.arange(m), platform, cfg.images_per_prompt, pixels=False)
    n = len(platform)
    specs = [
        Spec(
            f"c{i}",
            f"{i:064x}",
            "sim",
            DEFAULT_PROMPT_SET,
            "sim",
            [str(k) for k in range(n)],
            [[0] * cfg.images_per_prompt] * n,
            GenerationSettings(),
            z[i].half(),
            text,
            torch.zeros(n, cfg.images_per_prompt, 1, dtype=torch.float16),
            torch.zeros(n, 1, 1, 3, dtype=torch.uint8),
            torch.ones(n, cfg.images_per_prompt, dtype=torch.bool),
        )
        for i in range(m)
    ]
    _, rel, gamma = distances(specs, text)
    lineage = torch.arange(m) % max(1, m // 4)
    same = [float(rel[i, j]) for i in range(m) for j in range(i + 1, m) if lineage[i] == lineage[j]]
    other = [float(rel[i, j]) for i in range(m) for j in range(i + 1, m) if lineage[i] != lineage[j]]
    recommended = math.sqrt(max(same) * min(other)) if max(same) < min(other) else None
    return {
        "family": "b_near_duplicates (4 lineages x 4 checkpoints sharing 65% of style and interaction)",
        "near_duplicate_relative_distance": {"min": min(same), "max": max(same), "n": len(same)},
        "distinct_relative_distance": {"min": min(other), "max": max(other), "n": len(other)},
        "recommended_threshold": recommended,
        "threshold_used": NEAR_DUPLICATE_THRESHOLD,
        "separates": max(same) < NEAR_DUPLICATE_THRESHOLD < min(other),
        "gamma": gamma,
    }


def run_sections(cfg, seed: int) -> dict:
    torch.manual_seed(seed)
    return {
        "observed": observed_vs_generated(cfg, seed),
        "exchange": exchange_quantisation(cfg, seed),
        "library_map": library_map_threshold(cfg, seed),
    }
