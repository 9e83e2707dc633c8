"""`python -m gmi_core`: build specs, list them, identify an image, run the demo or the benchmarks."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cli_options import add_engine_options, engine_from_options, file_arg, without_abbreviations
from .errors import GmiError
from .limits import json_safe
from .paths import DEFAULT_HOME
from .protocols import BuildProgress, format_eta


def _progress_bar():
    """A tqdm bar over the images of one checkpoint, with the whole build's ETA, for BuildProgress callbacks."""
    from tqdm import tqdm

    state = {"bar": None, "name": None}

    def update(p: BuildProgress) -> None:
        if state["name"] != p.checkpoint:
            if state["bar"] is not None:
                state["bar"].close()
            label = f"[{p.checkpoint_index + 1}/{p.checkpoint_count}] {p.checkpoint}"
            state["bar"] = tqdm(total=p.images_total, initial=p.images_done, desc=label, unit="img", file=sys.stderr)
            state["name"] = p.checkpoint
        bar = state["bar"]
        bar.update(p.images_done - bar.n)
        bar.set_postfix_str(f"build {p.images_rendered}/{p.images_planned} img, {format_eta(p.eta_s)}", refresh=False)
        if p.images_done == p.images_total:
            bar.close()

    return update


def cmd_build(args) -> int:
    from .diffusers_generator import DiffusersGenerator

    gmi, source = engine_from_options(args)
    which = args.which if args.which in ("missing", "all") else args.which.split(",")
    plan = gmi.plan(source, which)  # lists and hashes once; build() renders exactly this plan
    skipped = plan.listing.skipped
    if not plan.listing.checkpoints:
        print(empty_folder_message(args.models, skipped), file=sys.stderr)
    for item in skipped:
        print(f"{item.name}: skipped: {item.reason}", file=sys.stderr)
    generator = DiffusersGenerator(config=args.config, local_files_only=not args.allow_download)
    print(
        f"gmi: budget {plan.budget}: {plan.images} image(s) to render for "
        f"{sum(1 for _, n in plan.checkpoints if n)} checkpoint(s)",
        file=sys.stderr,
    )
    try:
        report = gmi.build(source, generator, plan=plan, progress=_progress_bar())
    except KeyboardInterrupt:
        print("interrupted: finished prompts are saved; run build again to resume", file=sys.stderr)
        return 130
    for item in report.skipped[len(skipped) :]:  # skipped during the build (another process builds it)
        print(f"{item.name}: skipped: {item.reason}", file=sys.stderr)
    for name, reason in report.failed:
        print(f"{name}: failed: {reason}", file=sys.stderr)
    print(
        json.dumps(json_safe(report.to_dict()), indent=1, allow_nan=False)
        if args.json
        else f"built {len(report.built)} spec(s)"
    )
    return 1 if report.failed else 0


def cmd_specs(args) -> int:
    gmi, source = engine_from_options(args)
    statuses, skipped = gmi.status(source)
    if args.json:
        rows = [vars(s) for s in statuses] + [{"name": s.name, "state": "skipped", "detail": s.reason} for s in skipped]
        print(json.dumps(json_safe(rows), indent=1, allow_nan=False))
        return 0
    if not statuses and not skipped:
        print(empty_folder_message(args.models, skipped))
        return 0
    print(f"budget {gmi.budget.label(len(gmi.prompt_set))}; {gmi.plan(source).images} image(s) missing in all")
    print(f"{'state':8} {'images':>9} {'budget':8} {'family':6} {'hash':10}  checkpoint  (detail)")
    for s in statuses:
        images = f"{s.images_done}/{s.images_budget}"
        detail = f"  ({s.detail})" if s.detail else ""
        print(f"{s.state:8} {images:>9} {s.budget_done or '-':8} {s.family or '?':6} {s.sha256[:10]}  {s.name}{detail}")
    for s in skipped:
        print(f"{'skipped':8} {'':9} {'':8} {'':6} {'':10}  {s.name}  {s.reason}")
    return 0


def empty_folder_message(folder: Path, skipped) -> str:
    if skipped:
        return f"no usable checkpoints in {folder}: {len(skipped)} file(s) skipped (see why below)"
    return (
        f"the models folder {folder} holds no checkpoint files (.safetensors); put Stable Diffusion checkpoints there"
    )


def _print_ranking(result) -> None:
    print(f"method {result.method}; prompt ({result.prompt_source}): {result.pseudo_prompt}")
    print(f"{'rank':>4}  {'score':>10}  {'hash':10}  checkpoint  (best-matching spec prompts)")
    for r in result.ranking:
        prompts = "; ".join(m.prompt for m in r.top_prompts[:2])
        marks = ("" if r.installed else " [not installed]") + ("" if r.kind == "generated" else f" [{r.kind}]")
        marks += " [lora]" if r.model_kind == "lora" else ""
        marks += f" [partial spec: {r.prompts_done} prompts, {r.images_done} images]" if r.partial else ""
        print(f"{r.rank:>4}  {r.score:>10.5f}  {r.short_hash}  {r.name}{marks}  ({prompts})")
    for name, reason in result.excluded:
        print(f"   -  not ranked: {name}: {reason}")


def cmd_identify(args) -> int:
    from .images import load_image

    images = [load_image(path) for path in args.images]
    gmi, source = engine_from_options(args)
    result = gmi.identify(
        images,
        args.prompt,
        args.method,
        args.top_k,
        source,
        gamma=args.gamma,
        tau=args.tau,
        include_not_installed=args.include_not_installed,
        centre=args.centre,
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=1, allow_nan=False))
    else:
        _print_ranking(result)
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    demo = run_demo(
        args.workdir, checkpoints=args.checkpoints, seed=args.seed, progress=None if args.json else _progress_bar()
    )
    if args.json:
        print(json.dumps(demo.to_dict(), indent=1))
    else:
        print(f"query: '{demo.query_prompt}' (seed {demo.query_seed}) generated by {demo.true_checkpoint}")
        _print_ranking(demo.result)
        verdict = "correct" if demo.result.best.name == demo.true_checkpoint else "wrong"
        print(f"top-1 is {verdict}; report with thumbnails: {demo.report}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .ranker import DEFAULT_METHOD, METHODS

    parser = argparse.ArgumentParser(
        prog="gmi", description="Generative Model Identification for Stable Diffusion checkpoints"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    build = commands.add_parser("build", help="build specs for a folder of checkpoints (standalone, via diffusers)")
    add_engine_options(build)
    build.add_argument("--which", default="missing", help="missing | all | comma-separated checkpoint names")
    build.add_argument("--config", type=Path, help="local diffusers config folder (needed offline)")
    build.add_argument("--json", action="store_true")
    build.set_defaults(func=cmd_build)

    specs = commands.add_parser("specs", help="list checkpoints and the state of their specs")
    add_engine_options(specs)
    specs.add_argument("--json", action="store_true")
    specs.set_defaults(func=cmd_specs)

    identify = commands.add_parser("identify", help="rank checkpoints for reference image(s)")
    identify.add_argument("images", nargs="+", type=file_arg)
    add_engine_options(identify)
    identify.add_argument("--prompt", help="the prompt, if known (else the interrogator guesses one)")
    identify.add_argument("--top-k", type=int)
    identify.add_argument("--method", default=DEFAULT_METHOD, choices=METHODS)
    identify.add_argument("--gamma", type=float, help="kernel width (default: median heuristic)")
    identify.add_argument("--tau", type=float, help="prompt-weight temperature (default: clipped cosine)")
    identify.add_argument("--json", action="store_true")
    identify.add_argument(
        "--include-not-installed",
        action="store_true",
        help="also rank imported specs of checkpoints that are not in --models (marked)",
    )
    identify.add_argument(
        "--centre",
        action="store_true",
        help="prompt-conditional centring (gmi/rkme_clip; helps observed specs, see docs/observed-specs.md)",
    )
    identify.set_defaults(func=cmd_identify)

    from .library_cli import add_library_commands

    add_library_commands(commands, add_engine_options)
    from .hub.build import add_hub_commands

    add_hub_commands(commands, add_engine_options)

    demo = commands.add_parser("demo", help="end-to-end run on tiny random checkpoints (no downloads)")
    demo.add_argument("--workdir", type=Path, default=DEFAULT_HOME / "demo")
    demo.add_argument("--checkpoints", type=int, default=4)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--json", action="store_true")
    demo.set_defaults(func=cmd_demo)

    # Listed here for --help only: main() hands "bench ..." to gmi_core.bench before parsing, so the benchmarks
    # (40% of the package, with their own imports) load for that command alone.
    bench = commands.add_parser(
        "bench", add_help=False, help="benchmarks: identification quality and cost (JSON + PNG); gmi bench --help"
    )
    bench.add_argument("words", nargs=argparse.REMAINDER)
    return without_abbreviations(parser)


def main(argv=None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    if words[:1] == ["bench"]:
        from .bench import run_bench

        return run_bench(words)
    args = build_parser().parse_args(words)
    try:
        return args.func(args)
    except GmiError as exc:
        print(f"gmi: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, read-only store, a folder where a file should be: one line, no traceback
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"gmi: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
