"""``bench roundtrip``: the paper's protocol on real checkpoints through a Generator.

Specs are built from the platform prompts (seeds ``base_seed + i*S + s``); tasks are images the
checkpoint generates for the disjoint evaluation prompts with seeds never used for specs
(10**6 + ...); every method ranks all checkpoints through :meth:`gmi_core.engine.Gmi.identify`,
the same call the hosts make. The query's prompt is the interrogator's pseudo-prompt (default, as
in the paper) or the true evaluation prompt (``--prompt-source true``).

By default the checkpoints are tiny random SD1 checkpoints (:mod:`gmi_core.tiny`) and the encoder
the tiny random CLIP, all on CPU: this checks the machinery end to end in CI time; its accuracy
says nothing about real checkpoints. With ``--checkpoints DIR --encoder ViT-L-14`` on a GPU it is
the paper's experiment.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from ..ranker import METHODS

QUERY_SIZES = (1, 4)
TASK_SEED_BASE = 10**6


def _checkpoint_folder(args: argparse.Namespace, work: Path, count: int) -> tuple[Path, Path | None]:
    """(checkpoint folder, pipeline config): the user's, or ``count`` tiny random checkpoints written under ``work``."""
    if args.checkpoints:
        return Path(args.checkpoints), (Path(args.config) if args.config else None)
    from ..tiny import tiny_pipeline_config, write_tiny_checkpoint

    folder = work / "checkpoints"
    for i in range(count):
        write_tiny_checkpoint(folder / f"tiny-{i:02d}.safetensors", seed=100 + i)
    return folder, Path(args.config) if args.config else tiny_pipeline_config(work / "config")


def _run_tasks(gmi, only, generator, checkpoints, evaluation, settings, specs, budget_banks, true_prompt: bool):
    """Render every (checkpoint, evaluation prompt) task with unseen seeds and rank it: (positions per method and
    number of query images, positions per (estimator, budget), seconds spent identifying)."""
    from .synthetic import BUDGET_ESTIMATORS

    positions = {m: {n: [] for n in QUERY_SIZES} for m in METHODS}
    budget_positions = {(name, label): [] for name in BUDGET_ESTIMATORS for label in budget_banks}
    u, identify_s = max(QUERY_SIZES), 0.0
    for ci, ckpt in enumerate(checkpoints):
        for ei, prompt in enumerate(evaluation.prompts):
            seeds = [TASK_SEED_BASE + (ci * len(evaluation) + ei) * u + j for j in range(u)]
            images = generator.generate(ckpt, prompt, seeds, settings)
            query_prompt = prompt if true_prompt else None
            t0 = time.perf_counter()
            for key, position in rank_budgets(gmi, budget_banks, specs, ckpt, images[0], query_prompt or False).items():
                budget_positions[key].append(position)
            for n in QUERY_SIZES:
                for method in METHODS:
                    result = gmi.identify(images[:n], prompt=query_prompt, method=method, source=only)
                    order = [r.sha256 for r in result.ranking]
                    positions[method][n].append(order.index(ckpt.sha256) + 1)
            identify_s += time.perf_counter() - t0
        generator.release()
    return positions, budget_positions, identify_s


def run(args: argparse.Namespace) -> dict:
    import torch

    from ..budgets import Budget
    from ..charts import bar_chart
    from ..checkpoints import FolderCheckpointSource
    from ..diffusers_generator import DiffusersGenerator
    from ..encoders import tiny_encoder
    from ..engine import Gmi
    from ..factory import open_encoder
    from ..hashing import HASH_CACHE_FILE
    from ..prompts import load_prompt_set
    from ..protocols import GenerationSettings, ListedCheckpoints
    from .machine import machine_info
    from .synthetic import BUDGET_ESTIMATORS, PAPER, _metrics, budget_plot

    if args.threads:
        torch.set_num_threads(args.threads)
    quick = args.quick
    n_ckpt = args.checkpoint_count or (4 if quick else 16)
    n_platform = args.platform_prompts or (8 if quick else 55)
    n_eval = args.eval_prompts or (3 if quick else 18)
    images_per_prompt = args.images_per_prompt or (2 if quick else 4)
    settings = GenerationSettings(
        steps=args.steps or (4 if quick else 20),
        cfg=args.cfg,
        sampler=args.sampler,
        width=args.size or (64 if not args.checkpoints else 512),
        height=args.size or (64 if not args.checkpoints else 512),
    )
    work = Path(tempfile.mkdtemp(prefix="gmi-bench-roundtrip-", dir=args.workdir))
    try:
        folder, config = _checkpoint_folder(args, work, n_ckpt)
        source = FolderCheckpointSource(folder, hash_cache=work / HASH_CACHE_FILE)
        checkpoints = source.list_checkpoints().checkpoints[:n_ckpt]
        if len(checkpoints) < 2:
            raise SystemExit(f"bench roundtrip needs at least 2 checkpoints in {folder}")
        encoder = (
            tiny_encoder(0)
            if args.encoder == "tiny"
            else open_encoder(args.encoder, allow_download=args.allow_download)
        )
        platform = load_prompt_set().head(n_platform)
        evaluation = load_prompt_set("evaluation").head(n_eval)
        assert not set(platform.prompts) & set(evaluation.prompts), "evaluation prompts must not be platform prompts"
        generator = DiffusersGenerator(config=config, device=args.device)
        gmi = Gmi(
            Path(args.specs) if args.specs else work / "specs",
            encoder,
            platform,
            budget=Budget(None, images_per_prompt),
            settings=settings,
        )
        t = time.perf_counter()
        report = gmi.build(source, generator, which=[c.name for c in checkpoints])
        build_s = time.perf_counter() - t
        if report.failed:
            raise SystemExit(f"spec builds failed: {report.failed}")

        listing = source.list_checkpoints()  # identification restricted to the benchmark's checkpoints
        listing.checkpoints = [c for c in listing.checkpoints if c.name in {k.name for k in checkpoints}]
        only = ListedCheckpoints(listing)
        specs = gmi.library.load(only).specs
        budget_banks = budget_cut_banks(specs)
        t = time.perf_counter()
        positions, budget_positions, identify_s = _run_tasks(
            gmi,
            only,
            generator,
            checkpoints,
            evaluation,
            settings,
            specs,
            budget_banks,
            args.prompt_source == "true",
        )
        tasks_s = time.perf_counter() - t
        results_lora = None
        if args.loras:
            from .lora_roundtrip import run_loras

            results_lora = run_loras(
                gmi, generator, source, checkpoints, evaluation, settings, work, args.loras, build_s / len(checkpoints)
            )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    torch_positions = {m: {n: torch.tensor(v) for n, v in per.items()} for m, per in positions.items()}
    results = {"roundtrip": {m: {str(n): _metrics(torch_positions[m][n]) for n in QUERY_SIZES} for m in METHODS}}
    family = "roundtrip"
    by_estimator = {name: {family: {}} for name in BUDGET_ESTIMATORS}
    for (name, label), found in budget_positions.items():
        metrics = _metrics(torch.tensor(found))
        by_estimator[name][family][label] = {
            "images_per_spec": budget_banks[label][1],
            **{k: metrics[k] for k in ("top1", "top4", "mean_rank", "n_tasks")},
        }
    results_budget = by_estimator["gmi"]
    data = {
        "command": "roundtrip",
        "machine": machine_info(),
        "settings": {
            "quick": bool(quick),
            "checkpoints": [c.name for c in checkpoints],
            "checkpoint_kind": "tiny random SD1 checkpoints (gmi_core.tiny)" if not args.checkpoints else str(folder),
            "encoder": encoder.encoder_id,
            "platform_prompts": len(platform),
            "evaluation_prompts": len(evaluation),
            "images_per_prompt": images_per_prompt,
            "generation": settings.to_dict(),
            "prompt_source": args.prompt_source,
            "task_seeds": f"from {TASK_SEED_BASE}, never used for specs",
            "build_s": round(build_s, 1),
            "tasks_s": round(tasks_s, 1),
            "identify_s_total": round(identify_s, 1),
        },
        "results": results,
        "results_budget": results_budget,
        "results_budget_by_estimator": by_estimator,
        "families": {family: {"checkpoints": len(checkpoints), "chance_top1": round(1 / len(checkpoints), 4)}},
        "paper": PAPER,
    }
    if results_lora is not None:
        data["results_lora"] = results_lora
    data["targets"] = [
        {
            "target": "round trip: the generating checkpoint ranks first (gmi, 1 query image, every task)",
            "value": results[family]["gmi"]["1"]["top1"],
            "met": results[family]["gmi"]["1"]["top1"] == 1.0,
        }
    ]
    if args.plot != "none":
        plot = args.plot or str(Path(args.out).with_suffix(".png") if args.out else Path("bench-roundtrip.png"))
        bar_chart(
            plot,
            f"bench roundtrip: top-1 ({len(checkpoints)} checkpoints; hatched = 4 query images)",
            [family],
            list(METHODS),
            lambda g, s, n: results[g][s][str(n)]["top1"],
            QUERY_SIZES,
            chance={family: 1 / len(checkpoints)},
        )
        data["plot"] = plot
        data["plot_budget"] = str(
            budget_plot(
                Path(plot).with_name(Path(plot).stem + "-budget.png"),
                by_estimator,
                f"{encoder.encoder_id}, {len(checkpoints)} checkpoints",
            )
        )
    return data


def budget_cut_banks(specs) -> dict:
    """label -> (FeatureBank holding only the cells of that budget, images per spec), from the built specs."""
    import torch

    from ..budgets import CURVE
    from ..ranker import FeatureBank

    full = FeatureBank.from_specs(specs)
    n, width = full.image.shape[1], full.image.shape[2]
    banks = {}
    for budget in CURVE:
        label = budget.size_label(n)
        if label in banks or budget.images_per_prompt > width:
            continue
        keep = torch.zeros_like(full.mask)
        keep[:, budget.prompt_indices(n), : budget.images_per_prompt] = True
        mask = full.mask & keep
        image = full.image * mask[..., None]  # cells outside the budget are zero, as in a spec built to it
        bank = FeatureBank(full.names, image, full.prompt, mask.any(dim=2), full.pixel, full.popularity, mask)
        banks[label] = (bank, budget.images(n))
    return banks


def rank_budgets(gmi, banks: dict, specs, checkpoint, image, true_prompt) -> dict:
    """(estimator, budget) -> 1-based position of ``checkpoint`` in the gmi ranking of one query image."""
    from ..ranker import rank
    from .synthetic import BUDGET_ESTIMATORS

    query = gmi.encoder.encode_images([image])
    pseudo = true_prompt or gmi.interrogator.prompt_from_features(query)
    text = gmi.encoder.encode_texts([pseudo])[0]
    truth = [s.sha256 for s in specs].index(checkpoint.sha256)
    out = {}
    for label, (bank, _) in banks.items():
        for name, centre in BUDGET_ESTIMATORS.items():
            order = rank(bank, "gmi", query, text, centre=centre).order.tolist()
            out[(name, label)] = order.index(truth) + 1
    return out


def format_tables(data: dict) -> str:
    from .report import quality_tables

    s = data["settings"]
    head = (
        f"round trip: {len(s['checkpoints'])} checkpoints ({s['checkpoint_kind']}), encoder {s['encoder']}, "
        f"{s['platform_prompts']} platform prompts x {s['images_per_prompt']} images, {s['evaluation_prompts']} evaluation prompts, "
        f"pseudo-prompt from {s['prompt_source']}"
    )
    tables = head + "\n" + quality_tables(data)
    if "results_lora" in data:
        from .lora_roundtrip import lora_tables

        tables += "\n\nLoRA specs: " + lora_tables(data["results_lora"])
    return tables


def add_arguments(commands) -> None:
    p = commands.add_parser(
        "roundtrip", help="the paper's protocol through a Generator (tiny random checkpoints by default)"
    )
    p.add_argument("--out", help="JSON file (default bench-roundtrip.json); the PNG goes beside it")
    p.add_argument("--plot", help="PNG file, or 'none'")
    p.add_argument(
        "--quick",
        action="store_true",
        help="CI size: 4 tiny checkpoints, 8 platform prompts x 2 images, 3 evaluation prompts",
    )
    p.add_argument("--checkpoints", help="folder of real checkpoints (default: tiny random ones)")
    p.add_argument("--config", help="local diffusers config folder for offline single-file loading")
    p.add_argument("--checkpoint-count", type=int, help="use the first K checkpoints (default 16; 4 with --quick)")
    p.add_argument("--encoder", default="tiny", help="'tiny' or a known encoder name such as ViT-L-14/openai")
    p.add_argument("--allow-download", action="store_true", help="fetch the encoder's weights if missing")
    p.add_argument("--platform-prompts", type=int, help="first N platform prompts (default 55)")
    p.add_argument("--eval-prompts", type=int, help="first E evaluation prompts (default 18)")
    p.add_argument("--images-per-prompt", type=int, help="spec images per prompt (default 4)")
    p.add_argument("--steps", type=int)
    p.add_argument("--cfg", type=float, default=7.0)
    p.add_argument("--sampler", default="euler")
    p.add_argument("--size", type=int, help="image size (default 64 for tiny checkpoints, 512 otherwise)")
    p.add_argument("--prompt-source", choices=("interrogator", "true"), default="interrogator")
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--specs", help="spec store folder to reuse (default: a temporary one)")
    p.add_argument("--workdir", help="folder for temporary files")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--threads", type=int)
    p.add_argument(
        "--loras", type=int, default=0, help="also N tiny LoRAs on the first checkpoint (results_lora; N >= 8 advised)"
    )
