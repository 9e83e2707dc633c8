"""``python -m gmi_core.hub.bench --out docs/bench-hub.json``: hub build throughput with 1 and with 2 workers.

Tiny random checkpoints through the standalone diffusers generator on this machine's CPU, in a local Ray
(``num_cpus`` = workers), each run into a fresh store. ``startup_s`` (Ray start, actors loading their engine)
is reported apart from the build itself; ``images_per_second`` counts the build only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

PROMPTS = (
    "a red barn in a field",
    "a portrait of an old sailor",
    "a bowl of fruit on a table",
    "a city street at night",
    "a mountain lake at dawn",
    "a cat asleep on a sofa",
)


def measure(workdir: Path, workers: list[int], checkpoints: int, steps: int, images: int) -> dict:
    from ..cli import build_parser
    from ..demo import prepare_demo_models
    from .build import HubBuild, engine_options, plan_build, require_ray

    ray = require_ray()
    models, config, encoder = prepare_demo_models(workdir, checkpoints)
    prompt_file = workdir / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS))
    rows = {}
    for count in workers:
        args = build_parser().parse_args(
            [
                "hub",
                "build",
                "--models",
                str(models),
                "--home",
                str(workdir / "home"),
                "--encoder",
                str(encoder),
                "--prompt-set",
                str(prompt_file),
                "--budget",
                f"allx{images}",
                "--steps",
                str(steps),
                "--width",
                "64",
                "--height",
                "64",
                "--config",
                str(config),
                "--store",
                str(workdir / f"store-{count}"),
                "--workers",
                str(count),
            ]
        )
        _, plan, _ = plan_build(args)
        started = time.perf_counter()
        hub = HubBuild(engine_options(args), workers=count)
        startup = time.perf_counter() - started
        try:
            report = hub.run(plan)
        finally:
            hub.close()
        if report.failed:
            raise RuntimeError(f"hub build failed: {report.failed}")
        rows[str(count)] = {
            "workers": count,
            "images": report.images,
            "build_s": round(report.seconds, 2),
            "images_per_second": round(report.images_per_second, 3),
            "seconds_per_image": round(report.seconds / report.images, 3),
            "startup_s": round(startup, 1),
        }
    first, last = rows[str(workers[0])], rows[str(workers[-1])]
    return {
        "command": "hub",
        "settings": {
            "checkpoints": checkpoints,
            "prompts": len(PROMPTS),
            "images_per_prompt": images,
            "pipeline": f"tiny random SD1 checkpoints through diffusers on CPU, 64x64, {steps} steps; tiny random CLIP encoder",
            "ray": f"local Ray {ray.__version__}, num_cpus = workers, one CPU actor per worker",
        },
        "results": rows,
        "speedup": round(last["images_per_second"] / first["images_per_second"], 2),
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "note": "2 CPU cores shared with other work: the speedup of 2 workers is bounded by the free cores, not by Ray",
    }


def main(argv=None) -> int:
    from ..bench import machine_info

    parser = argparse.ArgumentParser(
        prog="python -m gmi_core.hub.bench", description=__doc__.splitlines()[0], allow_abbrev=False
    )
    parser.add_argument("--out", type=Path, default=Path("bench-hub.json"))
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--checkpoints", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--images", type=int, default=2, help="images per prompt")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="gmi-bench-hub-"))
    os.environ["RAY_TMPDIR"] = str(workdir)  # Ray's session files (logs, sockets) go with the rest of the bench's
    try:
        data = {**measure(workdir, args.workers, args.checkpoints, args.steps, args.images), "machine": machine_info()}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    for row in data["results"].values():
        print(
            f"{row['workers']} worker(s): {row['images']} images in {row['build_s']} s = {row['images_per_second']} img/s "
            f"({row['seconds_per_image']} s/image; startup {row['startup_s']} s)"
        )
    print(f"speedup: {data['speedup']}x; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
