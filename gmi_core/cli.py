"""`python -m gmi_core`: build specs, list them, identify an image, run the demo or the benchmarks."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .encoder_registry import DEFAULT_ENCODER, encoder_names
from .errors import GmiError
from .protocols import BuildProgress

DEFAULT_HOME = Path(os.environ.get("GMI_HOME", Path.home() / ".cache" / "gmi"))


def _progress_bar():
    """A tqdm bar over images, one per checkpoint, for BuildProgress callbacks."""
    from tqdm import tqdm

    state = {"bar": None, "name": None}

    def update(p: BuildProgress) -> None:
        if state["name"] != p.checkpoint:
            if state["bar"] is not None:
                state["bar"].close()
            label = f"[{p.checkpoint_index + 1}/{p.checkpoint_count}] {p.checkpoint}"
            state["bar"] = tqdm(total=p.images_total, desc=label, unit="img", file=sys.stderr)
            state["name"] = p.checkpoint
        bar = state["bar"]
        bar.update(p.images_done - bar.n)
        if p.prompts_done == p.prompts_total:
            bar.close()

    return update


def _download_bar():
    """A tqdm bar in bytes for a CLIP weights download (ProgressFn callbacks)."""
    from tqdm import tqdm

    state = {"bar": None}

    def update(done: int, total: int) -> None:
        if state["bar"] is None:
            state["bar"] = tqdm(total=total, desc="CLIP weights", unit="B", unit_scale=True, file=sys.stderr)
        bar = state["bar"]
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return update


def _add_engine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", type=Path, required=True, help="folder of .safetensors checkpoints")
    parser.add_argument("--home", type=Path, default=DEFAULT_HOME, help="gmi's data folder (specs, caches)")
    parser.add_argument("--encoder", default=DEFAULT_ENCODER,
                        help=f"CLIP encoder: one of {', '.join(encoder_names())}, or a gmi encoder .safetensors file")
    parser.add_argument("--clip-weights", type=Path, help="explicit weights file for --encoder (open_clip or transformers .safetensors)")
    parser.add_argument("--allow-download", action="store_true",
                        help="download missing CLIP weights into HOME/clip (huggingface_hub: HF_ENDPOINT, HF_HUB_OFFLINE apply)")
    parser.add_argument("--prompt-set", default="platform", help="built-in set name or a .json/.txt file")
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=7.0)
    parser.add_argument("--sampler", default="euler")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0, help="base seed of spec images")


def _engine(args):
    from .checkpoints import FolderCheckpointSource
    from .encoders import load_encoder
    from .engine import Gmi
    from .prompts import load_prompt_set
    from .protocols import GenerationSettings

    if not args.models.is_dir():
        raise GmiError(f"models folder {args.models} does not exist")
    clip_dir = args.home / "clip"
    encoder = load_encoder(args.encoder, search_dirs=[args.models], allow_download=args.allow_download,
                           download_dir=clip_dir, own_dirs=[clip_dir], weights=args.clip_weights, progress=_download_bar())
    settings = GenerationSettings(steps=args.steps, cfg=args.cfg, sampler=args.sampler, width=args.width, height=args.height)
    gmi = Gmi(args.home / "specs", encoder, load_prompt_set(args.prompt_set), args.images_per_prompt, settings, args.seed)

    def announce(path: Path) -> None:
        print(f"gmi: hashing {path.name} ({path.stat().st_size / 2**30:.1f} GiB, once; cached after)", file=sys.stderr)

    return gmi, FolderCheckpointSource(args.models, hash_cache=args.home / "hashes.json", on_hashing=announce)


def cmd_build(args) -> int:
    from .diffusers_generator import DiffusersGenerator

    gmi, source = _engine(args)
    statuses, skipped = gmi.status(source)
    if not statuses:
        print(f"no usable checkpoints in {args.models}", file=sys.stderr)
    for item in skipped:
        print(f"skipped {item.name}: {item.reason}", file=sys.stderr)
    generator = DiffusersGenerator(config=args.config, local_files_only=not args.allow_download)
    which = args.which if args.which in ("missing", "all") else args.which.split(",")
    try:
        report = gmi.build(source, generator, which, progress=_progress_bar())
    except KeyboardInterrupt:
        print("interrupted: finished prompts are saved; run build again to resume", file=sys.stderr)
        return 130
    for name, reason in report.failed:
        print(f"failed {name}: {reason}", file=sys.stderr)
    print(json.dumps(report.to_dict(), indent=1) if args.json else f"built {len(report.built)} spec(s)")
    return 1 if report.failed else 0


def cmd_specs(args) -> int:
    gmi, source = _engine(args)
    statuses, skipped = gmi.status(source)
    if args.json:
        rows = [vars(s) for s in statuses] + [{"name": s.name, "state": "skipped", "detail": s.reason} for s in skipped]
        print(json.dumps(rows, indent=1))
        return 0
    for s in statuses:
        print(f"{s.state:8} {s.prompts_done:3}/{s.prompts_total:<3} {s.sha256[:10]}  {s.name}  {s.detail}")
    for s in skipped:
        print(f"{'skipped':8} {'':7} {'':10}  {s.name}  {s.reason}")
    return 0


def _print_ranking(result) -> None:
    print(f"method {result.method}; prompt ({result.prompt_source}): {result.pseudo_prompt}")
    print(f"{'rank':>4}  {'score':>10}  {'hash':10}  checkpoint  (best-matching spec prompts)")
    for r in result.ranking:
        prompts = "; ".join(m.prompt for m in r.top_prompts[:2])
        print(f"{r.rank:>4}  {r.score:>10.5f}  {r.short_hash}  {r.name}  ({prompts})")
    for name, reason in result.excluded:
        print(f"   -  not ranked: {name}: {reason}")


def cmd_identify(args) -> int:
    from .images import load_image

    images = [load_image(path) for path in args.images]
    gmi, source = _engine(args)
    result = gmi.identify(images, args.prompt, args.method, args.top_k, source, gamma=args.gamma, tau=args.tau)
    if args.json:
        print(json.dumps(result.to_dict(), indent=1))
    else:
        _print_ranking(result)
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    demo = run_demo(args.workdir, checkpoints=args.checkpoints, seed=args.seed,
                    progress=None if args.json else _progress_bar())
    if args.json:
        print(json.dumps(demo.to_dict(), indent=1))
    else:
        print(f"query: '{demo.query_prompt}' (seed {demo.query_seed}) generated by {demo.true_checkpoint}")
        _print_ranking(demo.result)
        verdict = "correct" if demo.result.best.name == demo.true_checkpoint else "wrong"
        print(f"top-1 is {verdict}; report with thumbnails: {demo.report}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .bench import add_bench_parser
    from .ranker import DEFAULT_METHOD, METHODS

    parser = argparse.ArgumentParser(prog="gmi", description="Generative Model Identification for Stable Diffusion checkpoints")
    commands = parser.add_subparsers(dest="command", required=True)

    build = commands.add_parser("build", help="build specs for a folder of checkpoints (standalone, via diffusers)")
    _add_engine_options(build)
    build.add_argument("--which", default="missing", help="missing | all | comma-separated checkpoint names")
    build.add_argument("--config", type=Path, help="local diffusers config folder (needed offline)")
    build.add_argument("--json", action="store_true")
    build.set_defaults(func=cmd_build)

    specs = commands.add_parser("specs", help="list checkpoints and the state of their specs")
    _add_engine_options(specs)
    specs.add_argument("--json", action="store_true")
    specs.set_defaults(func=cmd_specs)

    identify = commands.add_parser("identify", help="rank checkpoints for reference image(s)")
    identify.add_argument("images", nargs="+", type=Path)
    _add_engine_options(identify)
    identify.add_argument("--prompt", help="the prompt, if known (else the interrogator guesses one)")
    identify.add_argument("--top-k", type=int)
    identify.add_argument("--method", default=DEFAULT_METHOD, choices=METHODS)
    identify.add_argument("--gamma", type=float, help="kernel width (default: median heuristic)")
    identify.add_argument("--tau", type=float, help="prompt-weight temperature (default: clipped cosine)")
    identify.add_argument("--json", action="store_true")
    identify.set_defaults(func=cmd_identify)

    demo = commands.add_parser("demo", help="end-to-end run on tiny random checkpoints (no downloads)")
    demo.add_argument("--workdir", type=Path, default=DEFAULT_HOME / "demo")
    demo.add_argument("--checkpoints", type=int, default=4)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--json", action="store_true")
    demo.set_defaults(func=cmd_demo)

    add_bench_parser(commands)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        from .bench import run_bench

        return run_bench(args)
    try:
        return args.func(args)
    except GmiError as exc:
        print(f"gmi: error: {exc}", file=sys.stderr)
        return 2
