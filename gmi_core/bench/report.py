"""Tables (text) and PNG charts drawn with PIL only (no matplotlib dependency)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

COLOURS = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (148, 103, 189),
    (127, 127, 127),
    (214, 39, 40),
    (23, 190, 207),
]


def _font(size: int = 13):
    for name in ("DejaVuSans.ttf", "Arial.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default()


def bar_chart(
    path,
    title: str,
    groups: Sequence[str],
    series: Sequence[str],
    values: Callable[[str, str, int], float | None],
    sizes: Sequence[int] = (1,),
    chance: dict | None = None,
    y_max: float = 1.0,
    y_label: str = "top-1",
) -> Path:
    """Grouped bars: one group per family, one bar per (series, size); sizes after the first are hatched."""
    path = Path(path)
    bar_w = 9
    group_w = len(series) * len(sizes) * bar_w + 24
    left, top, bottom, right = 56, 44, 70, 170
    width = max(640, left + right + group_w * len(groups))
    height = 420
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font, small = _font(14), _font(11)
    draw.text((left, 12), title, fill="black", font=font)
    plot_h = height - top - bottom
    y0 = top + plot_h
    for tick in range(0, 11, 2):
        v = y_max * tick / 10
        y = y0 - plot_h * tick / 10
        draw.line([(left, y), (width - right, y)], fill=(225, 225, 225))
        draw.text((8, y - 7), f"{v:.1f}", fill="black", font=small)
    draw.text((8, top - 24), y_label, fill="black", font=small)
    for gi, group in enumerate(groups):
        gx = left + 12 + gi * group_w
        for si, name in enumerate(series):
            for ni, n in enumerate(sizes):
                v = values(group, name, n)
                x = gx + (si * len(sizes) + ni) * bar_w
                if v is None:
                    continue
                h = plot_h * max(0.0, min(1.0, v / y_max))
                colour = COLOURS[si % len(COLOURS)]
                draw.rectangle([x, y0 - h, x + bar_w - 2, y0], fill=colour)
                if ni:
                    for yy in range(int(y0 - h), int(y0), 4):
                        draw.line([(x, yy), (x + bar_w - 2, yy)], fill="white")
        if chance and group in chance:
            y = y0 - plot_h * min(1.0, chance[group] / y_max)
            draw.line([(gx - 4, y), (gx + group_w - 20, y)], fill="black", width=1)
        draw.text((gx, y0 + 6), group.replace("_", " ")[:22], fill="black", font=small)
    for si, name in enumerate(series):
        y = top + si * 18
        draw.rectangle([width - right + 14, y, width - right + 26, y + 12], fill=COLOURS[si % len(COLOURS)])
        draw.text((width - right + 32, y - 1), name, fill="black", font=small)
    if chance:
        y = top + len(series) * 18 + 4
        draw.line([(width - right + 14, y + 6), (width - right + 26, y + 6)], fill="black")
        draw.text((width - right + 32, y), "chance", fill="black", font=small)
    draw.line([(left, y0), (width - right, y0)], fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def line_chart(
    path,
    title: str,
    xs: Sequence[float],
    lines: dict[str, Sequence[float | None]],
    x_label: str,
    y_label: str,
    log_x=True,
    log_y=True,
) -> Path:
    """Lines over a (log) x axis; None values are skipped."""
    path = Path(path)
    width, height = 720, 420
    left, top, bottom, right = 70, 44, 56, 190
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font, small = _font(14), _font(11)
    draw.text((left, 12), title, fill="black", font=font)
    vals = [v for series in lines.values() for v in series if v is not None and v > 0]
    if not vals:
        vals = [1.0]
    fx = (lambda v: math.log10(v)) if log_x else (lambda v: v)
    fy = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    x_lo, x_hi = fx(min(xs)), fx(max(xs))
    y_lo, y_hi = fy(min(vals)), fy(max(vals))
    if log_y:
        y_lo, y_hi = math.floor(y_lo), math.ceil(y_hi)
    if y_hi == y_lo:
        y_hi = y_lo + 1
    if x_hi == x_lo:
        x_hi = x_lo + 1
    pw, ph = width - left - right, height - top - bottom

    def px(x, y):
        return left + pw * (fx(x) - x_lo) / (x_hi - x_lo), top + ph * (1 - (fy(y) - y_lo) / (y_hi - y_lo))

    ticks = range(int(y_lo), int(y_hi) + 1) if log_y else [y_lo + (y_hi - y_lo) * i / 5 for i in range(6)]
    for t in ticks:
        v = 10**t if log_y else t
        _, y = px(xs[0], v)
        draw.line([(left, y), (left + pw, y)], fill=(225, 225, 225))
        draw.text((6, y - 7), f"{v:g}", fill="black", font=small)
    for x in xs:
        X, _ = px(x, 10**y_lo if log_y else y_lo)
        draw.text((X - 14, top + ph + 6), f"{x:,}", fill="black", font=small)
    draw.text((left + pw // 2 - 40, height - 22), x_label, fill="black", font=small)
    draw.text((6, top - 26), y_label, fill="black", font=small)
    for li, (name, series) in enumerate(lines.items()):
        colour = COLOURS[li % len(COLOURS)]
        pts = [px(x, v) for x, v in zip(xs, series) if v is not None and v > 0]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        for X, Y in pts:
            draw.ellipse([X - 3, Y - 3, X + 3, Y + 3], fill=colour)
        y = top + li * 18
        draw.line([(width - right + 12, y + 6), (width - right + 28, y + 6)], fill=colour, width=3)
        draw.text((width - right + 34, y), name, fill="black", font=small)
    draw.rectangle([left, top, left + pw, top + ph], outline="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


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
