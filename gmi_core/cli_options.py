"""The engine options every CLI command shares (build, specs, identify, the library and hub commands) and the
engine they describe, through the core's factory (:mod:`gmi_core.factory`)."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .budgets import BUDGETS, DEFAULT_BUDGET
from .encoder_files import console_download_bar
from .encoder_registry import DEFAULT_ENCODER, encoder_names
from .errors import GmiError
from .families import FAMILY_DEFAULTS
from .hashing import HASH_CACHE_FILE
from .lora_cli import add_lora_options, with_loras
from .paths import DEFAULT_HOME
from .prompts import DEFAULT_PROMPT_SET
from .protocols import CheckpointSource, GenerationSettings

if TYPE_CHECKING:
    from .engine import Gmi


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def folder_arg(text: str) -> Path:
    """A path argument that names a folder: a file there is refused at once, in one line."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder")
    return path


def file_arg(text: str) -> Path:
    """A path argument that names a local file: a URL or a folder is refused at once, in one line."""
    if _URL.match(text):
        raise argparse.ArgumentTypeError(f"{text[:200]}: gmi reads local files; download it first and give its path")
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory, not a regular file")
    return path


def without_abbreviations(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Turns argparse's prefix matching off in a parser and all its subcommands: ``--encoder X`` must not be taken
    as ``--encoder-id X`` (nor any other option a typo happens to prefix); a wrong argument is one line."""
    parser.allow_abbrev = False
    parser.error = lambda message: parser.exit(2, f"{parser.prog}: error: {message} (--help lists the options)\n")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                without_abbreviations(sub)
    return parser


def add_engine_options(parser: argparse.ArgumentParser, models_required: bool = True) -> None:
    parser.add_argument(
        "--models", type=folder_arg, required=models_required, help="folder of .safetensors checkpoints"
    )
    parser.add_argument("--home", type=Path, default=DEFAULT_HOME, help="gmi's data folder (specs, caches)")
    parser.add_argument(
        "--encoder",
        default=DEFAULT_ENCODER,
        help=f"CLIP encoder: one of {', '.join(encoder_names())}, or a gmi encoder .safetensors file",
    )
    parser.add_argument(
        "--clip-weights", type=Path, help="explicit weights file for --encoder (open_clip or transformers .safetensors)"
    )
    parser.add_argument(
        "--allow-download",
        action="store_true",
        help="download missing CLIP weights into HOME/clip (huggingface_hub: HF_ENDPOINT, HF_HUB_OFFLINE apply)",
    )
    parser.add_argument("--prompt-set", default=DEFAULT_PROMPT_SET, help="built-in set name or a .json/.txt file")
    parser.add_argument(
        "--budget",
        default=DEFAULT_BUDGET,
        help=f"spec budget: {', '.join(f'{k} ({v.label()})' for k, v in BUDGETS.items())} or PROMPTSxIMAGES",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FAMILY.FIELD=VALUE",
        help="per-family generation setting, e.g. sdxl.steps=30 or sd1.width=640 (no family: all families); "
        "defaults: "
        + "; ".join(
            f"{f} {v['width']}x{v['height']} {v['steps']} steps cfg {v['cfg']}" for f, v in FAMILY_DEFAULTS.items()
        ),
    )
    parser.add_argument("--steps", type=int, help="steps for every family (same as --set steps=N)")
    parser.add_argument("--cfg", type=float, help="CFG for every family")
    parser.add_argument("--width", type=int, help="width for every family")
    parser.add_argument("--height", type=int, help="height for every family")
    parser.add_argument("--sampler", default=GenerationSettings.sampler, help="sampler name of the diffusers runner")
    parser.add_argument("--seed", type=int, default=0, help="base seed of spec images")
    add_lora_options(parser)


def engine_from_options(args: argparse.Namespace) -> tuple[Gmi, CheckpointSource | None]:
    """The engine and the checkpoint source (None without --models) that the parsed options describe."""
    from .checkpoints import FolderCheckpointSource
    from .factory import EncoderFolders, make_engine
    from .families import FamilySettings, parse_overrides

    if args.models is not None and not args.models.is_dir():
        raise GmiError(f"models folder {args.models} does not exist")
    overrides = parse_overrides(args.set)
    for name in ("steps", "cfg", "width", "height"):
        if getattr(args, name) is not None:
            overrides.setdefault("*", {})[name] = getattr(args, name)
    settings = FamilySettings.defaults(GenerationSettings(sampler=args.sampler), overrides)
    spec_root = getattr(args, "store", None) or args.home / "specs"  # hub build: --store, a folder the workers share
    gmi = make_engine(
        spec_root,
        args.encoder,
        args.prompt_set,
        args.budget,
        settings,
        args.seed,
        folders=EncoderFolders.under_home(args.home, args.models),
        allow_download=args.allow_download,
        download_progress=console_download_bar(),
        weights=args.clip_weights,
    )

    def announce(path: Path) -> None:
        print(f"gmi: hashing {path.name} ({path.stat().st_size / 2**30:.1f} GiB, once; cached after)", file=sys.stderr)

    if args.models is None:
        return gmi, None
    checkpoints = FolderCheckpointSource(args.models, hash_cache=args.home / HASH_CACHE_FILE, on_hashing=announce)
    return gmi, with_loras(args, checkpoints, args.home / HASH_CACHE_FILE, announce)
