"""The CLI's LoRA options: a LoRA folder beside --models, strengths, bases, and the checkpoints / LoRAs filter."""

from __future__ import annotations

import argparse
from pathlib import Path

from .errors import GmiError
from .limits import DEFAULT_LORA_STRENGTH
from .loras import DIFFUSERS_FORMATS, MODEL_KINDS, LoraSource, lora_files_in, parse_choices


def add_lora_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--loras", type=Path, help="folder of LoRA .safetensors files: one spec per LoRA and strength on its base"
    )
    parser.add_argument(
        "--lora-strength",
        action="append",
        default=[],
        metavar="[LORA=]W[,W]",
        help=f"LoRA strength(s): for all LoRAs (default {DEFAULT_LORA_STRENGTH:g}) or one LoRA (its file name or stem); "
        "several strengths give one spec each",
    )
    parser.add_argument(
        "--lora-base",
        action="append",
        default=[],
        metavar="FAMILY|LORA=CHECKPOINT",
        help="base checkpoint for a family's LoRAs (sd1=my.safetensors) or one LoRA; default: the base the LoRA's "
        "metadata names if installed, else the family's first checkpoint",
    )
    parser.add_argument(
        "--kind", choices=MODEL_KINDS, default="both", help="which models: checkpoints, LoRAs on checkpoints, or both"
    )
    parser.add_argument("--on-checkpoint", metavar="NAME", help="only the LoRAs on this checkpoint (name or hash)")


def with_loras(args, checkpoints, hash_cache: Path, announce):
    """The CLI's source: the checkpoint folder, plus the LoRA folder's combinations when --loras is given."""
    if args.loras is None:
        if args.kind == "loras" or args.on_checkpoint:
            raise GmiError("--kind loras and --on-checkpoint need --loras FOLDER")
        return checkpoints
    if not args.loras.is_dir():
        raise GmiError(f"LoRA folder {args.loras} does not exist")
    return LoraSource(
        checkpoints,
        lambda: lora_files_in(args.loras),
        parse_choices(args.lora_strength, args.lora_base),
        hash_cache=hash_cache,
        kinds=args.kind,
        on_base=args.on_checkpoint,
        formats=DIFFUSERS_FORMATS,
        host="diffusers",
        on_hashing=announce,
    )
