"""``bench roundtrip --loras N``: LoRA specs on one base, identified among LoRA rows and among LoRA + checkpoint rows.

N tiny kohya LoRAs (:mod:`gmi_core.tiny_lora`) are written for the first benchmark checkpoint: most independent, every
fourth one "near" the one before it (a small perturbation of it: the hard pairs), and the first also at strength 0.5.
Their specs are built through the same engine build as the checkpoints' (same prompts, seeds and budget; the base
stays loaded); tasks are renders of each combination for the evaluation prompts with unseen seeds. Results:
top-1 / top-4 / mean rank over LoRA rows only and over the mixed ranking, the near pairs' top-2 rate, and the cost of
a LoRA spec against a checkpoint spec at the same budget.
"""

from __future__ import annotations

import time
from pathlib import Path

NEAR_EVERY = 4  # LoRA i (i % 4 == 3) is a near copy of LoRA i - 1
SECOND_STRENGTH = 0.5  # the first LoRA is also built at this strength
TASK_SEED_BASE = 2 * 10**6


def write_bench_loras(folder: Path, count: int) -> dict[str, str]:
    """``count`` tiny LoRAs; {near LoRA name: the name it is near}."""
    from ..tiny_lora import write_tiny_lora

    near = {}
    for i in range(count):
        name = f"lora-{i:02d}.safetensors"
        if i % NEAR_EVERY == NEAR_EVERY - 1:
            write_tiny_lora(folder / name, seed=500 + i, near=500 + i - 1)
            near[name] = f"lora-{i - 1:02d}.safetensors"
        else:
            write_tiny_lora(folder / name, seed=500 + i)
    return near


def run_loras(
    gmi,
    generator,
    checkpoint_source,
    checkpoints,
    evaluation,
    settings,
    work: Path,
    count: int,
    checkpoint_spec_s: float,
) -> dict:
    """The ``results_lora`` block of bench roundtrip."""
    import torch

    from ..loras import LoraChoices, LoraSource, lora_files_in
    from ..protocols import ListedCheckpoints
    from .synthetic import _metrics

    folder = work / "loras"
    near = write_bench_loras(folder, count)
    first, base_name = "lora-00.safetensors", checkpoints[0].name
    choices = LoraChoices(
        strengths_per_lora={first: (SECOND_STRENGTH, 1.0)}, base_per_family={checkpoints[0].family or "sd1": base_name}
    )
    lora_source = LoraSource(checkpoint_source, lambda: lora_files_in(folder), choices, work / "hashes.json", "loras")
    combos = lora_source.list_checkpoints().checkpoints
    loads_before = generator.base_loads
    t = time.perf_counter()
    report = gmi.build(lora_source, generator, which=[c.name for c in combos])
    build_s = time.perf_counter() - t
    if report.failed:
        raise SystemExit(f"LoRA spec builds failed: {report.failed}")
    base_loads = generator.base_loads - loads_before
    names = {c.name for c in checkpoints}
    lora_rows = ListedCheckpoints(lora_source.list_checkpoints())
    both = LoraSource(checkpoint_source, lambda: lora_files_in(folder), choices, work / "hashes.json", "both")
    mixed_listing = both.list_checkpoints()
    mixed_listing.checkpoints = [c for c in mixed_listing.checkpoints if c.lora or c.name in names]
    mixed_rows = ListedCheckpoints(mixed_listing)
    positions = {"lora_rows": [], "mixed_rows": []}
    near_top2 = []
    t = time.perf_counter()
    for ci, combo in enumerate(combos):
        for ei, prompt in enumerate(evaluation.prompts):
            seed = TASK_SEED_BASE + ci * len(evaluation) + ei
            image = generator.generate(combo, prompt, [seed], settings)
            for key, rows in (("lora_rows", lora_rows), ("mixed_rows", mixed_rows)):
                order = [r.sha256 for r in gmi.identify(image, prompt=prompt, source=rows).ranking]
                positions[key].append(order.index(combo.sha256) + 1)
            if combo.lora.name in near or combo.lora.name in near.values():
                near_top2.append(positions["lora_rows"][-1] <= 2)
    tasks_s = time.perf_counter() - t
    per_lora_spec = build_s / max(1, len(combos))
    return {
        "n_loras": count,
        "n_lora_specs": len(combos),
        "base": base_name,
        "near_pairs": [[a, b] for a, b in near.items()],
        "two_strengths": {first: [SECOND_STRENGTH, 1.0]},
        "prompt_source": "true",
        "results": {key: _metrics(torch.tensor(found)) for key, found in positions.items()},
        "near_pairs_top2": round(sum(near_top2) / max(1, len(near_top2)), 4),
        "cost": {
            "seconds_per_lora_spec": round(per_lora_spec, 3),
            "seconds_per_checkpoint_spec": round(checkpoint_spec_s, 3),
            "ratio": round(per_lora_spec / checkpoint_spec_s, 3) if checkpoint_spec_s else None,
            "base_loads_for_all_lora_specs": base_loads,
        },
        "tasks_s": round(tasks_s, 1),
    }


def lora_tables(block: dict) -> str:
    """Markdown of a ``results_lora`` block (docs/loras.md is made from it)."""
    lines = [
        f"{block['n_loras']} LoRAs, {block['n_lora_specs']} LoRA specs on {block['base']}; one query image per task, "
        f"prompt: {block['prompt_source']}",
        "",
        "| rows ranked | tasks | top-1 | top-2 | top-4 | mean rank |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for key, label in (("lora_rows", "LoRA rows"), ("mixed_rows", "LoRA + checkpoint rows")):
        r = block["results"][key]
        lines.append(
            f"| {label} | {r['n_tasks']} | {r['top1']:.3f} | {r['top2']:.3f} | {r['top4']:.3f} | {r['mean_rank']:.2f} |"
        )
    cost = block["cost"]
    lines += [
        "",
        f"Near pairs ({', '.join(' ~ '.join(pair) for pair in block['near_pairs'])}): the true row within the top 2 in "
        f"{block['near_pairs_top2']:.0%} of their tasks.",
        f"Cost at the same budget: {cost['seconds_per_lora_spec']:.2f} s per LoRA spec against "
        f"{cost['seconds_per_checkpoint_spec']:.2f} s per checkpoint spec (ratio {cost['ratio']}); the base was loaded "
        f"{cost['base_loads_for_all_lora_specs']} time(s) for all LoRA specs.",
    ]
    return "\n".join(lines)
