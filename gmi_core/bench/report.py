"""Markdown tables of the benchmarks' JSON (the charts are in :mod:`gmi_core.charts`)."""

from __future__ import annotations

from collections.abc import Sequence


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def quality_tables(data: dict) -> str:
    """Markdown tables of a quality bench: one per number of query images, families x methods."""
    sections = (_accuracy_lines, _paper_lines, _gamma_lines, _budget_lines, _target_lines)
    return "\n".join(line for section in sections for line in section(data)).lstrip("\n")


def _accuracy_lines(data: dict) -> list[str]:
    lines = []
    res, fams = data["results"], data.get("families", {})
    for n in ("1", "4"):
        if not any(n in per for methods in res.values() for per in methods.values()):
            continue
        lines.append(
            f"\n{n} query image{'s' if n != '1' else ''} per task: top-1 / top-2 / top-3 / top-4 accuracy, mean rank"
        )
        lines.append(_row(["family", "M", "tasks", "method", "top-1", "top-2", "top-3", "top-4", "mean rank"]))
        lines.append(_row(["---"] * 9))
        for fam, methods in res.items():
            for method, per in methods.items():
                r = per.get(n)
                if isinstance(r, str):
                    lines.append(_row([fam, "", "", method, r, "", "", "", ""]))
                elif r is not None:
                    m = str(fams.get(fam, {}).get("checkpoints", ""))
                    accuracy = [f"{r[f'top{k}']:.3f}" for k in (1, 2, 3, 4)]
                    lines.append(_row([fam, m, str(r["n_tasks"]), method, *accuracy, f"{r['mean_rank']:.2f}"]))
    return lines


def _paper_lines(data: dict) -> list[str]:
    paper = data.get("paper", {})
    if not paper:
        return []
    lines = [f"\nPaper ({paper.get('source', '')}):", _row(["method", "top-1", "top-2", "top-3", "top-4", "mean rank"])]
    lines.append(_row(["---"] * 6))
    for method in ("gmi", "rkme_clip", "rkme_concat", "rkme_basic", "download"):
        p = paper.get(method, {})
        accuracy = [f"{p[k]:.3f}" if k in p else "" for k in ("top1", "top2", "top3", "top4")]
        lines.append(_row([method, *accuracy, str(p.get("mean_rank", ""))]))
    if paper.get("later_paper"):
        lines.append(f"Later paper: {paper['later_paper']}.")
    return lines


def _gamma_lines(data: dict) -> list[str]:
    sweep = data.get("gamma_sweep") or {}
    if not sweep:
        return []
    factors = list(next(iter(next(iter(sweep.values())).values())).keys())
    lines = ["\nGamma sweep (top-1 with 1 / 4 query images; gamma = factor x median heuristic)"]
    lines.append(_row(["family", "method"] + [f"x{f}" for f in factors]))
    lines.append(_row(["---"] * (2 + len(factors))))
    for fam, methods in sweep.items():
        for method, per in methods.items():
            lines.append(
                _row([fam, method] + [f"{per[f]['1']['top1']:.3f} / {per[f]['4']['top1']:.3f}" for f in factors])
            )
    return lines


def _budget_lines(data: dict) -> list[str]:
    lines = []
    by_estimator = data.get("results_budget_by_estimator") or {"gmi": data.get("results_budget") or {}}
    for estimator, budgets in by_estimator.items():
        if not budgets:
            continue
        first = next(iter(budgets.values()))
        labels = sorted(first, key=lambda b: (first[b]["images_per_spec"], b))
        lines.append(
            f"\nBudget curve ({estimator}, 1 query image): top-1 / top-4 / mean rank per budget (prompts x images per prompt)"
        )
        lines.append(_row(["family"] + [f"{b} ({first[b]['images_per_spec']} img)" for b in labels]))
        lines.append(_row(["---"] * (1 + len(labels))))
        for fam, per in budgets.items():
            cells = [
                f"{per[b]['top1']:.3f} / {per[b]['top4']:.3f} / {per[b]['mean_rank']:.2f}" if b in per else ""
                for b in labels
            ]
            lines.append(_row([fam, *cells]))
    for estimator, choice in (data.get("budget_choice_by_estimator") or {"gmi": data.get("budget_choice")}).items():
        if choice:
            lines.append(
                f"Best budget of <= 64 images for {estimator} (smallest worst top-1 gap to full): {choice.get('budget')} {choice}"
            )
    return lines


def _target_lines(data: dict) -> list[str]:
    targets = data.get("targets") or []
    if not targets:
        return []
    return ["\nTargets"] + [f"- [{'met' if t['met'] else 'MISSED'}] {t['target']}: {t['value']}" for t in targets]


def refine_tables(data: dict) -> str:
    """Markdown tables of ``results_refine_by_estimator`` and ``calibration_by_estimator`` (bench synthetic and
    roundtrip): what each refine policy reaches and renders, and how the confidence's flags split right / wrong."""
    lines = []
    policies = data.get("results_refine_by_estimator") or {"gmi": data.get("results_refine") or {}}
    for estimator, families in policies.items():
        if not families:
            continue
        lines += [
            f"\nRefine policies ({estimator}; 1 query image): top-1 / top-4 / mean rank, images rendered per query "
            "(full: per library, M x (full - default)), share of queries flagged ambiguous",
            _row(["family", "policy", "top-1", "top-4", "mean rank", "images rendered", "ambiguous", "tasks"]),
            _row(["---"] * 8),
        ]
        for family, rows in families.items():
            for policy, r in rows.items():
                cells = [f"{r['top1']:.3f}", f"{r['top4']:.3f}", f"{r['mean_rank']:.2f}"]
                cells += [f"{r['images_rendered_mean']:.1f}", f"{r['ambiguous_rate']:.3f}", str(r["n_tasks"])]
                lines.append(_row([family, policy, *cells]))
    calibration = data.get("calibration_by_estimator") or {"gmi": data.get("calibration") or {}}
    for estimator, families in calibration.items():
        if not families:
            continue
        lines += [
            f"\nConfidence calibration ({estimator}, default budget): queries flagged / not flagged x right / wrong",
            _row(
                [
                    "family",
                    "not flagged, right",
                    "not flagged, wrong",
                    "flagged, right",
                    "flagged, wrong",
                    "top-1 not flagged",
                ]
            ),
            _row(["---"] * 6),
        ]
        for family, c in families.items():
            top1 = "-" if c["top1_unambiguous"] is None else f"{c['top1_unambiguous']:.3f}"
            counts = [str(c[k]) for k in ("not_flagged_right", "not_flagged_wrong", "flagged_right", "flagged_wrong")]
            lines.append(_row([family, *counts, top1]))
    return "\n".join(lines)


def refine_doc_tables(synthetic: dict, roundtrip: dict) -> str:
    """The measured section of docs/confidence.md, from bench synthetic's and bench roundtrip's JSON."""
    lines = ["### bench synthetic (`docs/bench-synthetic.json`)", refine_tables(synthetic)]
    engine = synthetic.get("results_refine_engine") or {}
    if any(engine.values()):
        lines += [
            "\nThe same policies through the engine's own identify, confidence and refine ranking (the refined "
            "contenders ranked among themselves), first tasks of the family: they must equal the batched numbers "
            "on those tasks (a target below):",
            _row(["estimator", "family", "policy", "top-1", "top-4", "mean rank", "images rendered", "tasks"]),
            _row(["---"] * 8),
        ]
        for estimator, families in engine.items():
            for family, rows in families.items():
                for policy, r in rows.items():
                    cells = [f"{r['top1']:.3f}", f"{r['top4']:.3f}", f"{r['mean_rank']:.2f}"]
                    lines.append(
                        _row([estimator, family, policy, *cells, f"{r['images_rendered_mean']:.1f}", str(r["n_tasks"])])
                    )
    comparison = synthetic.get("centring_comparison")
    if comparison:
        lines += [
            "\nCentred minus gmi top-1 (bench synthetic):",
            _row(["family", "policy", "centred - gmi"]),
            _row(["---"] * 3),
        ]
        for family, rows in comparison["top1_centred_minus_gmi"].items():
            lines += [_row([family, policy, f"{delta:+.3f}"]) for policy, delta in rows.items()]
        lines.append(
            f"\nNever worse where measured: {comparison['never_worse_where_measured']}; not measured centred: "
            f"{', '.join(comparison['not_measured_centred']) or 'none'}."
        )
    lines += ["\n### bench roundtrip (`docs/bench-roundtrip.json`)", refine_tables(roundtrip)]
    lines.append("\nTargets (from the JSON):")
    for data in (synthetic, roundtrip):
        for target in data.get("targets", []):
            if any(word in target["target"] for word in ("refine", "unambiguous")):
                lines.append(f"- {'met' if target['met'] else '**not met**'}: {target['target']} — `{target['value']}`")
    return "\n".join(lines)


README_JSON = ("docs/bench-synthetic.json", "docs/bench-roundtrip.json", "docs/bench-roundtrip-lora.json")


def readme_summary(synthetic: dict, roundtrip: dict, lora: dict) -> str:
    """README's "Measured" section: refine on the family the default budget misses and on the round trip, the LoRA
    round trip and the centring decision, from the JSON files of :data:`README_JSON`."""
    refine_family = next(f for f, s in synthetic["refine_details"]["gmi"].items() if "engine_check" in s)
    lines = [
        _row(
            [
                "bench",
                "estimator",
                "top-1, default budget",
                "+ refine of the contenders",
                "full budget",
                "images per ambiguous query",
            ]
        ),
        _row(["---"] * 6),
    ]
    for data, family in ((synthetic, refine_family), (roundtrip, "roundtrip")):
        for estimator, families in data["results_refine_by_estimator"].items():
            rows = families[family]
            images = data["refine_details"][estimator][family]["images_per_ambiguous_query"]
            top1 = [f"{rows[p]['top1']:.3f}" for p in ("default", "refine_contenders", "full")]
            bench = f"synthetic {family}" if family != "roundtrip" else "round trip, tiny checkpoints"
            name = f"{bench} ({rows['full']['n_tasks']} queries)"
            lines.append(_row([name, estimator.replace("gmi_", "gmi "), *top1, f"{images:.0f}"]))
    block = lora["results_lora"]
    lines += [
        "",
        f"LoRAs (`bench roundtrip --loras {block['n_loras']}`: {block['n_lora_specs']} LoRA specs on one base, near "
        f"pairs within the top 2 in {block['near_pairs_top2']:.0%} of their queries; a LoRA spec costs "
        f"{block['cost']['ratio']:.2f}x a checkpoint spec, the base staying loaded):",
        "",
        _row(["rows ranked", "queries", "top-1", "top-2", "mean rank"]),
        _row(["---"] * 5),
    ]
    for key, label in (("lora_rows", "LoRA rows"), ("mixed_rows", "LoRA + checkpoint rows")):
        r = block["results"][key]
        lines.append(_row([label, str(r["n_tasks"]), f"{r['top1']:.3f}", f"{r['top2']:.3f}", f"{r['mean_rank']:.2f}"]))
    comparison = synthetic["centring_comparison"]
    worse = [f for f, rows in comparison["top1_centred_minus_gmi"].items() if any(d < 0 for d in rows.values())]
    trip = roundtrip["results_refine_by_estimator"]
    if any(trip["gmi_centred"]["roundtrip"][p]["top1"] < r["top1"] for p, r in trip["gmi"]["roundtrip"].items()):
        worse.append("the round trip")
    unmeasured = comparison["not_measured_centred"]
    state = (f"worse than gmi on {', '.join(worse)}" if worse else "never worse than gmi where measured") + (
        f"; not measured with refine on {', '.join(unmeasured)}" if unmeasured else ""
    )
    lines.append(
        "\nCentring (CLI `identify --centre`) becomes the default only when it is never worse than gmi on every family "
        f"and the round trip; it stays opt-in: {state}."
    )
    return "\n".join(lines)


if __name__ == "__main__":  # python -m gmi_core.bench.report: README's "Measured" section from the docs JSON
    import json
    from pathlib import Path

    print(readme_summary(*(json.loads(Path(path).read_text(encoding="utf-8")) for path in README_JSON)))
