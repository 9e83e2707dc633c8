"""Confidence calibration and refine policies, measured on features already rendered at the full budget.

Specs are cut to the default budget exactly as a default build holds them (the budget's prompts, its first seeds);
"refining" a spec replaces it by its full-budget cells, which is what :func:`gmi_core.refine.refine` renders. For
every task (one query image) the policies are:

* ``default``: the default budget alone;
* ``refine_contenders``: the confidence (:mod:`gmi_core.confidence`) at the default budget; when it is ambiguous,
  the contenders' specs (at most ``limits.REFINE_MAX_CONTENDERS``) are refined and the library ranked again;
* ``refine_top2`` / ``refine_top4`` / ``refine_top8``: the first k rows refined for every query;
* ``full``: every spec at the full budget (its images are rendered up front: ``images_rendered_mean`` counts what
  that costs per library over the default, M x (full - default), not per query).

Each task starts from the default library (a refine does not carry over to the next task: the conservative
count). After a refine the refined specs are ranked among themselves (their own kernel width and centring), ahead of
the others in the default ranking's order: what :func:`gmi_core.refine.contenders_first` does.
"""

from __future__ import annotations

import torch

from ..budgets import BUDGETS, DEFAULT_BUDGET
from ..centring import centre_library, centre_query
from ..confidence import contender_mask, separation
from ..fastrank import query_means_many, rank_positions, scores_from_means
from ..limits import CONFIDENCE_ROWS, REFINE_MAX_CONTENDERS
from ..ranker import kbar, median_gamma

POLICIES = ("default", "refine_contenders", "refine_top2", "refine_top4", "refine_top8", "full")
FIXED_TOP = {"refine_top2": 2, "refine_top4": 4, "refine_top8": 8}
TASK_CHUNK = 32  # tasks whose confidence is computed in one batch


def _scores(feats, queries, weights, gamma):
    means = query_means_many(feats, queries, [gamma], (1,))[(gamma, 1)]
    return scores_from_means(means, kbar(feats, gamma), weights)


def _renormalised(weights: torch.Tensor) -> torch.Tensor:
    return weights / weights.sum(dim=1, keepdim=True).clamp(min=1e-12)


def task_confidence(
    feats, queries, weights, scores, gamma: float, rows: int = CONFIDENCE_ROWS
) -> tuple[torch.Tensor, torch.Tensor]:
    """(order [T, K] of the top rows, z [T, K]) of each task's ranking: complete specs ``feats`` [M, N, S, d] with
    shared prompts, one query each ``queries`` [T, 1, d], prompt weights [T, N], scores [T, M] at ``gamma``."""
    m, n, s, _ = feats.shape
    k = min(rows, m)
    order = torch.argsort(scores, dim=1, stable=True)[:, :k]
    zs = []
    for start in range(0, len(order), TASK_CHUNK):
        top = order[start : start + TASK_CHUNK]
        b = len(top)
        image = feats[top]  # [B, K, N, S, d]
        mask = torch.ones(b, k, n, s, dtype=torch.bool)
        w = weights[start : start + b, None, :].expand(b, k, n)
        zs.append(separation(image, mask, w, queries[start : start + b], gamma)[2])
    return order, torch.cat(zs)


def _metrics(positions: torch.Tensor, images: torch.Tensor, ambiguous: torch.Tensor) -> dict:
    p = positions.float()
    return {
        "top1": round(float((p <= 1).float().mean()), 4),
        "top4": round(float((p <= 4).float().mean()), 4),
        "mean_rank": round(float(p.mean()), 4),
        "images_rendered_mean": round(float(images.float().mean()), 2),
        "ambiguous_rate": round(float(ambiguous.float().mean()), 4),
        "n_tasks": len(p),
    }


def _library_view(feats, prompts, queries, q_text, centre: bool):
    """(specs, queries) as the ranker sees them: prompt-conditionally centred by these specs' own cells when
    ``centre``."""
    if not centre:
        return feats, queries.float()
    centred, rows = centre_library(feats, prompts, torch.ones(feats.shape[:3], dtype=torch.bool))
    return centred, centre_query(queries.float(), q_text, rows)


def contenders_first_positions(
    feats, prompts, queries, q_text, weights, s_before, refined, truth, centre: bool
) -> torch.Tensor:
    """The true checkpoint's position per task after refining the specs ``refined`` [T, M] (bool) to ``feats``
    [M, N, S, d]: they are ranked among themselves (own kernel width, own centring), ahead of the others in the
    order of ``s_before`` [T, M]."""
    positions = rank_positions(s_before, truth)
    for t in torch.nonzero(refined.any(dim=1)).flatten().tolist():
        chosen = torch.nonzero(refined[t]).flatten()
        own, query = _library_view(feats[chosen], prompts, queries[t : t + 1], q_text[t : t + 1], centre)
        local = _scores(own, query, weights[t : t + 1], median_gamma(own))[0]
        inside = torch.nonzero(chosen == truth[t]).flatten()
        if len(inside):
            positions[t] = rank_positions(local[None], inside)[0]
        else:
            behind = s_before[t : t + 1].clone()
            behind[0, chosen] = float("inf")
            positions[t] = len(chosen) + rank_positions(behind, truth[t : t + 1])[0]
    return positions


def calibration_table(right: torch.Tensor, flagged: torch.Tensor) -> dict:
    """flagged / not flagged x right / wrong counts, and top-1 among the queries called unambiguous."""
    unflagged = ~flagged
    return {
        "not_flagged_right": int((unflagged & right).sum()),
        "not_flagged_wrong": int((unflagged & ~right).sum()),
        "flagged_right": int((flagged & right).sum()),
        "flagged_wrong": int((flagged & ~right).sum()),
        "top1_unambiguous": round(float(right[unflagged].float().mean()), 4) if unflagged.any() else None,
        "top1_ambiguous": round(float(right[flagged].float().mean()), 4) if flagged.any() else None,
    }


def refine_section(
    image: torch.Tensor,
    prompt: torch.Tensor,
    q_img: torch.Tensor,
    q_text: torch.Tensor,
    weights: torch.Tensor,
    truth: torch.Tensor,
    centre: bool = False,
    policies: bool = True,
    default: str = DEFAULT_BUDGET,
    full: str = "full",
) -> dict:
    """{"calibration": ..., "policies": {policy: metrics}} (policies only when ``policies``) for specs rendered at
    the full budget ``image`` [M, N, S, d], prompts [N, d], one query image per task ``q_img`` [T, >=1, d], pseudo
    prompts ``q_text`` [T, d], the tasks' prompt weights over all N prompts [T, N] and true checkpoints [T]."""
    n = image.shape[1]
    low, high = BUDGETS[default], BUDGETS[full]
    idx = low.prompt_indices(n)
    sub, query = _library_view(image[:, idx, : low.images_per_prompt], prompt[idx], q_img[:, :1], q_text, centre)
    w_low = _renormalised(weights[:, idx])
    g_low = median_gamma(sub)
    s_low = _scores(sub, query, w_low, g_low)
    order, z = task_confidence(sub, query, w_low, s_low, g_low)
    flags = contender_mask(z)
    ambiguous = flags[:, 1:].any(dim=1)
    pos_low = rank_positions(s_low, truth)
    right = pos_low == 1
    out = {
        "budget_default": low.size_label(n),
        "budget_full": high.size_label(n),
        "calibration": calibration_table(right, ambiguous),
    }
    if not policies:
        return out

    full_idx = high.prompt_indices(n)
    raw_full = image[:, full_idx, : high.images_per_prompt]
    w_full = _renormalised(weights[:, full_idx])
    full_feats, full_query = _library_view(raw_full, prompt[full_idx], q_img[:, :1], q_text, centre)
    g_full = median_gamma(full_feats)
    s_full = _scores(full_feats, full_query, w_full, g_full)
    per_spec = high.images(n) - low.images(n)
    m = image.shape[0]

    def refined(rows: torch.Tensor) -> torch.Tensor:  # rows [T, M] bool: specs refined for each task
        return contenders_first_positions(
            raw_full, prompt[full_idx], q_img[:, :1], q_text, w_full, s_low, rows, truth, centre
        )

    results = {"default": _metrics(pos_low, torch.zeros(len(truth)), ambiguous)}
    chosen = torch.zeros_like(s_low, dtype=torch.bool)
    capped = flags & (torch.cumsum(flags.long(), dim=1) <= REFINE_MAX_CONTENDERS)
    chosen.scatter_(1, order, capped & ambiguous[:, None])
    images = chosen.sum(dim=1) * per_spec
    results["refine_contenders"] = _metrics(refined(chosen), images, ambiguous)
    for name, k in FIXED_TOP.items():
        top = torch.zeros_like(chosen)
        top.scatter_(1, torch.argsort(s_low, dim=1, stable=True)[:, : min(k, m)], True)
        results[name] = _metrics(refined(top), top.sum(dim=1) * per_spec, ambiguous)
    _, z_full = task_confidence(full_feats, full_query, w_full, s_full, g_full)
    ambiguous_full = contender_mask(z_full)[:, 1:].any(dim=1)
    results["full"] = _metrics(rank_positions(s_full, truth), torch.full((len(truth),), m * per_spec), ambiguous_full)
    out["policies"] = results
    out["calibration_full"] = calibration_table(rank_positions(s_full, truth) == 1, ambiguous_full)
    amb = images[ambiguous]
    out["images_per_ambiguous_query"] = round(float(amb.float().mean()), 2) if len(amb) else 0.0
    out["images_unambiguous_max"] = int(images[~ambiguous].max()) if (~ambiguous).any() else 0
    out["images_full_minus_default_per_spec"] = per_spec
    return out


SHORT = {"default": "default", "refine_contenders": "contenders", "full": "full"}


def refine_plot(path, by_estimator: dict, subtitle: str, families=None):
    """Top-1 against images rendered per query for each refine policy (full: per library), one line per family and
    estimator; ``by_estimator`` is results_refine_by_estimator."""
    from ..charts import scatter_chart

    series = {}
    for estimator, per_family in by_estimator.items():
        for family, rows in per_family.items():
            if families and family not in families:
                continue
            series[f"{family} {estimator.removeprefix('gmi_') if estimator != 'gmi' else 'gmi'}"] = [
                (row["images_rendered_mean"], row["top1"], SHORT.get(policy, policy.removeprefix("refine_")))
                for policy, row in rows.items()
            ]
    return scatter_chart(
        path,
        f"refine: top-1 against images rendered per query ({subtitle})",
        series,
        "images rendered per query (full: per library)",
        "top-1",
    )


def centring_comparison(by_estimator: dict, all_families=()) -> dict:
    """Centred minus gmi top-1 per family and policy (results_refine_by_estimator), the families measured for gmi
    only, and whether centring is never worse where both were measured (the condition to make it the default)."""
    gmi, centred = by_estimator.get("gmi", {}), by_estimator.get("gmi_centred", {})
    deltas = {
        family: {
            policy: round(centred[family][policy]["top1"] - rows[policy]["top1"], 4)
            for policy in rows
            if policy in centred[family]
        }
        for family, rows in gmi.items()
        if family in centred
    }
    return {
        "top1_centred_minus_gmi": deltas,
        "never_worse_where_measured": all(d >= 0 for rows in deltas.values() for d in rows.values()),
        "not_measured_centred": sorted(set(all_families) - set(deltas)),
    }


ENGINE_CHECK_TASKS = 96  # tasks re-ranked with the engine's own ranker (each refine a new library: CPU-bound)


def engine_check(
    image: torch.Tensor,
    prompt: torch.Tensor,
    q_img: torch.Tensor,
    q_text: torch.Tensor,
    truth: torch.Tensor,
    centre: bool,
    tasks: int = ENGINE_CHECK_TASKS,
    default: str = DEFAULT_BUDGET,
    full: str = "full",
) -> dict:
    """default / refine_contenders / full through exactly what identify computes (:func:`gmi_core.ranker.rank` and
    :func:`gmi_core.confidence.ranking_confidence` on a FeatureBank holding each spec's cells; after a refine the
    contenders ranked as a library of their own, as :func:`gmi_core.refine.contenders_first` does), for the first
    ``tasks`` tasks: the check of the batched measurement in :func:`refine_section`."""
    from ..confidence import ranking_confidence
    from ..ranker import FeatureBank, rank

    m, n = image.shape[:2]
    low, high = BUDGETS[default], BUDGETS[full]
    base = torch.zeros(m, n, image.shape[2], dtype=torch.bool)
    base[:, low.prompt_indices(n), : low.images_per_prompt] = True
    top = torch.zeros_like(base)
    top[:, high.prompt_indices(n), : high.images_per_prompt] = True
    names = [f"c{i}" for i in range(m)]

    def library(refined: list[int]) -> FeatureBank:
        mask = base.clone()
        mask[refined] = top[refined]
        return FeatureBank(names, image * mask[..., None], prompt, mask.any(2), None, [None] * m, image_mask=mask)

    default_bank, full_bank = library([]), library(list(range(m)))
    positions = {"default": [], "refine_contenders": [], "full": []}
    rendered, flagged = [], []
    per_spec = high.images(n) - low.images(n)
    for t in range(min(tasks, len(truth))):
        query, text = q_img[t, :1], q_text[t]
        before = rank(default_bank, "gmi", query, text, centre=centre)
        confidence = ranking_confidence(default_bank, before, query, text, centre=centre)
        contenders = confidence.contenders[:REFINE_MAX_CONTENDERS] if confidence.ambiguous else []
        order = before.order.tolist()
        positions["default"].append(order.index(int(truth[t])) + 1)
        if contenders:  # ranked among themselves on their refined cells, the others behind in the first order
            own = FeatureBank(
                [names[i] for i in contenders],
                image[contenders] * top[contenders][..., None],
                prompt,
                top[contenders].any(2),
                None,
                [None] * len(contenders),
                image_mask=top[contenders],
            )
            local = [contenders[i] for i in rank(own, "gmi", query, text, centre=centre).order.tolist()]
            order = local + [i for i in order if i not in contenders]
        positions["refine_contenders"].append(order.index(int(truth[t])) + 1)
        positions["full"].append(
            rank(full_bank, "gmi", query, text, centre=centre).order.tolist().index(int(truth[t])) + 1
        )
        rendered.append(len(contenders) * per_spec)
        flagged.append(confidence.ambiguous)
    images, ambiguous = torch.tensor(rendered), torch.tensor(flagged)
    out = {}
    for policy, found in positions.items():
        spent = images if policy == "refine_contenders" else torch.zeros_like(images)
        out[policy] = _metrics(
            torch.tensor(found), spent if policy != "full" else torch.full_like(images, m * per_spec), ambiguous
        )
    return out


if __name__ == "__main__":  # python -m gmi_core.bench.refine_bench SYNTHETIC.json ROUNDTRIP.json: the docs tables
    import json
    import sys
    from pathlib import Path

    from .report import refine_doc_tables

    print(refine_doc_tables(*(json.loads(Path(path).read_text(encoding="utf-8")) for path in sys.argv[1:3])))
