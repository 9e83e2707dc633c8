"""Benchmarks: ``python -m gmi_core bench synthetic|roundtrip|scale|identify``.

Each command writes JSON ``{"command", "machine", "settings", "results", ...}`` and a PNG chart.
The CLI wires :func:`add_bench_parser` into its subcommands and calls :func:`run_bench`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..paths import write_json_atomic

COMMANDS = ("synthetic", "roundtrip", "scale", "identify")


def write_json(path: Path, data: dict) -> None:
    write_json_atomic(path, data, default=_jsonable, allow_nan=True)


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``bench`` with its commands to an argparse subparsers object; returns the parser."""
    from . import identify, roundtrip, scale, synthetic

    bench = subparsers.add_parser("bench", help="benchmarks: identification quality and cost (JSON + PNG)")
    commands = bench.add_subparsers(dest="bench_command", required=True)
    for module in (synthetic, roundtrip, scale, identify):
        module.add_arguments(commands)
    return bench


def build_parser() -> argparse.ArgumentParser:
    from ..cli_options import without_abbreviations

    parser = argparse.ArgumentParser(prog="gmi")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    return without_abbreviations(parser)


def run_bench(argv=None) -> int:
    """Entry point: ``argv`` is either the words after ``bench`` or a parsed argparse Namespace."""
    if isinstance(argv, argparse.Namespace):
        args = argv
    else:
        words = list(sys.argv[1:] if argv is None else argv)
        if not words or words[0] != "bench":
            words = ["bench", *words]
        args = build_parser().parse_args(words)
    from . import identify, roundtrip, scale, synthetic

    if args.bench_command == "identify" and args.child:  # one measured process of bench identify
        print(json.dumps(identify.run_child(json.loads(args.child))))
        return 0
    module = {"synthetic": synthetic, "roundtrip": roundtrip, "scale": scale, "identify": identify}[args.bench_command]
    started = time.perf_counter()
    data = module.run(args)
    data.setdefault("wall_s", round(time.perf_counter() - started, 1))
    out = Path(args.out) if args.out else Path(f"bench-{args.bench_command}.json")
    write_json(out, data)
    print(module.format_tables(data))
    print(f"\nwrote {out}", end="")
    if data.get("plot"):
        print(f" and {data['plot']}", end="")
    print()
    return 0
