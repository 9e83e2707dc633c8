"""CLI commands for specs without generating: import-images, export, import, map."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .cli_options import engine_from_options, file_arg, folder_arg
from .hashing import HASH_CACHE_FILE
from .paths import DEFAULT_HOME


def cmd_import_images(args) -> int:
    from .observed import import_images

    gmi, source = engine_from_options(args)
    report = import_images(
        gmi,
        source.list_checkpoints(),
        args.folder,
        progress=None if args.json else (lambda msg: print(f"gmi: {msg}", file=sys.stderr)),
    )
    data = report.to_dict()
    if args.json:
        print(json.dumps(data, indent=1))
        return 0
    print(
        f"scanned {data['scanned']} image(s); added {data['added_total']} to {len(data['added'])} observed spec(s)"
        + (
            f"; {data['interrogated_prompts']} prompt(s) interrogated (none recorded)"
            if data["interrogated_prompts"]
            else ""
        )
    )
    for spec in data["specs"]:
        print(f"  {spec['name']}: {spec['kind']} spec, {spec['observed_images']} observed image(s)")
    if data["skipped"]:
        print(f"skipped {len(data['skipped'])}: " + ", ".join(f"{n} {r}" for r, n in data["skipped_by_reason"].items()))
        for item in data["skipped"][: args.show_skipped]:
            print(f"  {item['file']}: {item['reason']}")
        if len(data["skipped"]) > args.show_skipped:
            print(f"  … {len(data['skipped']) - args.show_skipped} more (--json lists all)")
    return 0


def cmd_export(args) -> int:
    from .checkpoints import FolderCheckpointSource
    from .exchange import exportable_specs, is_exchange_file, write_exchange
    from .paths import user_output
    from .store import SpecStore

    user_output(args.out, args.force, is_exchange_file)  # before any work

    store = SpecStore(args.home / "specs")
    shas = None
    if args.models is not None:
        listing = FolderCheckpointSource(args.models, hash_cache=args.home / HASH_CACHE_FILE).list_checkpoints()
        wanted = [c for c in listing.checkpoints if not args.checkpoint or c.name in args.checkpoint]
        shas = {c.sha256 for c in wanted}
    specs = exportable_specs(store, args.encoder_id, None, shas)
    out = write_exchange(specs, args.out, thumbnails=args.thumbnails, lossless=args.lossless)
    size = out.stat().st_size
    print(f"exported {len(specs)} spec(s) to {out} ({size / 1000:.1f} KB, {size / 1000 / len(specs):.1f} KB per spec)")
    return 0


def cmd_import(args) -> int:
    from .errors import EncoderUnavailable
    from .exchange import import_files, local_prompt_features
    from .factory import EncoderFolders, open_encoder
    from .store import SpecStore

    store = SpecStore(args.home / "specs")
    state = {}

    def derive(encoder_id, prompt_set):
        found = local_prompt_features(store)(encoder_id, prompt_set)
        if found is not None:
            return found
        if "encoder" not in state:  # loaded only when no local spec has the prompt features
            try:
                state["encoder"] = open_encoder(
                    args.encoder, EncoderFolders.under_home(args.home), args.allow_download, weights=args.clip_weights
                )
            except EncoderUnavailable as exc:
                print(f"gmi: {exc}", file=sys.stderr)
                state["encoder"] = None
        encoder = state["encoder"]
        return local_prompt_features(store, encoder)(encoder_id, prompt_set) if encoder is not None else None

    report = import_files(store, args.files, derive).to_dict()
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        for a in report["actions"]:
            print(f"{a['action']:10} {a['sha256'][:10]:10}  {a['checkpoint']}  {a['detail']}  ({a['file']})")
        print(", ".join(f"{v} {k}" for k, v in report["summary"].items()))
    return 1 if report["summary"]["rejected"] else 0


def cmd_map(args) -> int:
    from .errors import NoSpecsError
    from .library_map import NEAR_DUPLICATE_THRESHOLD, build_map, draw_map, is_map_image
    from .limits import check_number
    from .paths import user_output

    if args.out:
        user_output(args.out, args.force, is_map_image)
    threshold = NEAR_DUPLICATE_THRESHOLD
    if args.threshold is not None:  # checked before anything is loaded
        threshold = float(check_number("--threshold", args.threshold, "threshold"))
    gmi, source = engine_from_options(args)
    loaded = gmi.library.load(source, include_not_installed=True)
    if not loaded.items:
        raise NoSpecsError("no specs to map; build or import specs first")
    lib = build_map(
        loaded.specs,
        gmi.prompt_features,
        threshold,
        loaded.excluded,
        loaded.installed,
    )
    data = lib.to_dict()
    if args.out:
        data["image"] = str(draw_map(lib, args.out))
    if args.json:
        print(json.dumps(data, indent=1))
        return 0
    print(f"{len(lib.names)} checkpoint(s); near-duplicate threshold {lib.threshold} (relative distance)")
    for number, members in enumerate(data["groups"], start=1):
        print(f"group {number}: {', '.join(members)}")
    if not data["groups"]:
        print("no near-duplicates")
    for row in data["checkpoints"]:
        near = row["nearest"]
        mark = "" if row["installed"] else " [not installed]"
        print(
            f"  {row['short_hash']}  {row['name']}{mark}: nearest {near['name']} ({near['relative_distance']})"
            if near
            else f"  {row['short_hash']}  {row['name']}{mark}"
        )
    if args.out:
        print(f"map image: {data['image']}")
    return 0


def add_library_commands(commands, add_engine_options) -> None:
    p = commands.add_parser(
        "import-images", help="build observed specs from images already on disk (nothing generated)"
    )
    p.add_argument("folder", type=folder_arg, help="folder of images (scanned recursively)")
    add_engine_options(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("--show-skipped", type=int, default=20, help="skipped files listed (all with --json)")
    p.set_defaults(func=cmd_import_images)

    p = commands.add_parser("export", help="write specs to a shareable file (docs/spec-format.md)")
    p.add_argument("--home", type=Path, default=DEFAULT_HOME, help="gmi's data folder (specs, caches)")
    p.add_argument("--models", type=folder_arg, help="only specs of checkpoints in this folder")
    p.add_argument("--checkpoint", nargs="+", help="only these checkpoint names (with --models)")
    p.add_argument("--encoder-id", help="only specs of this encoder id")
    p.add_argument("--out", type=Path, default=Path("gmi-specs.safetensors"))
    p.add_argument("--force", action="store_true", help="replace an existing --out file that gmi did not write")
    p.add_argument("--thumbnails", action="store_true", help="include the 64x64 thumbnails (off by default)")
    p.add_argument("--lossless", action="store_true", help="fp16 features as stored (larger; default: int8 compact)")
    p.set_defaults(func=cmd_export)

    p = commands.add_parser("import", help="add specs from shared spec files (validated; never replaces a bigger spec)")
    p.add_argument("files", nargs="+", type=file_arg)
    add_engine_options(p, models_required=False)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_import)

    p = commands.add_parser("map", help="pairwise spec distances, near-duplicate groups and a 2-D map image")
    add_engine_options(p, models_required=False)
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", type=Path, help="PNG map image")
    p.add_argument("--force", action="store_true", help="replace an existing --out file that gmi did not write")
    p.add_argument("--threshold", type=float, help="near-duplicate threshold (relative distance)")
    p.set_defaults(func=cmd_map)
