"""``python -m gmi_core hub build``: specs for many checkpoints as a Ray job, one generator actor per GPU.

The unit of work is one checkpoint. Each actor holds one standalone diffusers generator and one engine on the
shared store folder, and builds a checkpoint exactly as the local ``build`` does (:meth:`gmi_core.engine.Gmi.build`:
the same spec format, per-spec lock, and a save after every prompt). A killed actor is restarted by Ray and its
checkpoint retried: the retry resumes from the saved prompts, so a crash loses at most the prompt in flight; a
restarted job skips the specs that are ready and tops up the partial ones. Ray is an optional extra
(``pip install 'gmi[hub]'``); without ``--ray-address`` the job starts a local Ray.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import GmiError
from ..hashing import HASH_CACHE_FILE
from ..protocols import CheckpointInfo, CheckpointListing, ListedCheckpoints, SkippedCheckpoint, format_eta

TASK_RETRIES = 3  # a checkpoint whose build kills its worker this often is reported as failed


def require_ray():
    try:
        import ray
    except ImportError as exc:
        raise GmiError("hub build needs Ray: pip install 'gmi[hub]'") from exc
    return ray


class ListedCheckpointSource:
    """Checkpoints named in a text file, one path per line (relative to the file; ``#`` starts a comment)."""

    def __init__(self, list_file: Path, hash_cache: Path | None = None):
        self.list_file, self.hash_cache = Path(list_file), hash_cache

    def list_checkpoints(self) -> CheckpointListing:
        from ..checkpoints import inspect_model_cached, renders_sd_single_files
        from ..hashing import HashCache

        listing = CheckpointListing()
        cache = HashCache(self.hash_cache)
        lines = self.list_file.read_text(encoding="utf-8").splitlines()
        for line in (raw.split("#", 1)[0].strip() for raw in lines):
            if not line:
                continue
            path = Path(line) if Path(line).is_absolute() else self.list_file.parent / line
            if not path.is_file():
                listing.skipped.append(SkippedCheckpoint(path.name, path, "file not found"))
                continue
            found = renders_sd_single_files(inspect_model_cached(path, cache), path)  # what diffusers renders
            if found.reason:
                listing.skipped.append(SkippedCheckpoint(path.name, path, found.reason))
                continue
            listing.checkpoints.append(CheckpointInfo(path.name, path, cache.sha256(path), family=found.family))
        cache.save()
        return listing


def checkpoint_source(models: Path, hash_cache: Path | None):
    """A folder of checkpoints or a list file of them."""
    from ..checkpoints import FolderCheckpointSource

    if Path(models).is_dir():
        return FolderCheckpointSource(models, hash_cache=hash_cache)
    if Path(models).is_file():
        return ListedCheckpointSource(models, hash_cache)
    raise GmiError(f"--models {models} is neither a folder of checkpoints nor a list file")


class _OneCheckpoint:
    def __init__(self, checkpoint: CheckpointInfo):
        self.checkpoint = checkpoint

    def list_checkpoints(self) -> CheckpointListing:
        return CheckpointListing([self.checkpoint])


def engine_options(args: argparse.Namespace) -> dict:
    """The engine options every worker rebuilds its engine from (plain values: they travel to other machines)."""
    keys = (
        "home",
        "encoder",
        "clip_weights",
        "allow_download",
        "prompt_set",
        "budget",
        "set",
        "steps",
        "cfg",
        "width",
        "height",
        "sampler",
        "seed",
        "store",
        "config",
    )
    return {k: getattr(args, k) for k in keys}


class BuildWorker:
    """One generator and one engine on the shared store; builds whole checkpoints, one at a time."""

    def __init__(self, options: dict):
        import torch

        from ..cli_options import engine_from_options
        from ..diffusers_generator import DiffusersGenerator

        if not torch.cuda.is_available():
            torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))  # Ray's CPU share
        args = argparse.Namespace(**options, models=None)
        self.gmi, _ = engine_from_options(args)
        self.generator = DiffusersGenerator(
            config=options.get("config"), local_files_only=not options.get("allow_download")
        )

    def pid(self) -> int:
        return os.getpid()

    def build(self, checkpoint: CheckpointInfo) -> dict:
        """{"name", "state": built | skipped | failed, "reason", "images": rendered now, "seconds"}."""
        started, rendered = time.perf_counter(), [0]

        def progress(p) -> None:
            rendered[0] = p.images_rendered

        report = self.gmi.build(_OneCheckpoint(checkpoint), self.generator, [checkpoint.name], progress=progress)
        state, reason = "built", ""
        if report.failed:
            state, reason = "failed", report.failed[0][1]
        elif report.skipped:
            state, reason = "skipped", report.skipped[0].reason
        return {
            "name": checkpoint.name,
            "state": state,
            "reason": reason,
            "images": rendered[0],
            "seconds": round(time.perf_counter() - started, 3),
            "pid": os.getpid(),
        }


@dataclass
class HubReport:
    built: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    images: int = 0  # rendered by this job
    seconds: float = 0.0
    workers: int = 0
    results: list[dict] = field(default_factory=list)  # one per checkpoint, as the workers returned them

    @property
    def images_per_second(self) -> float | None:
        return self.images / self.seconds if self.seconds else None

    def to_dict(self) -> dict:
        return {
            "built": self.built,
            "skipped": [{"name": n, "reason": r} for n, r in self.skipped],
            "failed": [{"name": n, "reason": r} for n, r in self.failed],
            "images": self.images,
            "seconds": round(self.seconds, 3),
            "workers": self.workers,
            "images_per_second": self.images_per_second,
        }


class HubBuild:
    """The Ray side: the generator actors (one per GPU, else ``workers`` CPU actors), and a queue of checkpoints."""

    def __init__(
        self, options: dict, workers: int | None = None, num_gpus: int | None = None, address: str | None = None
    ):
        ray = require_ray()
        self.ray = ray
        self._started = not ray.is_initialized()
        if self._started:
            local = {} if address else {"num_gpus": num_gpus, "num_cpus": workers if num_gpus is None else None}
            ray.init(address=address, include_dashboard=False, **{k: v for k, v in local.items() if v is not None})
        gpus = int(num_gpus if num_gpus is not None else ray.cluster_resources().get("GPU", 0))
        count = gpus or workers or 1
        resources = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": 1}
        actor = ray.remote(max_restarts=-1, max_task_retries=TASK_RETRIES)(BuildWorker)
        self.workers = [actor.options(**resources).remote(options) for _ in range(count)]
        self.pids = ray.get([w.pid.remote() for w in self.workers])  # also waits until every engine is loaded
        self.assignments: dict[str, int] = {}  # checkpoint name -> worker index, for the progress report and tests

    def run(self, plan: list[tuple[CheckpointInfo, int]], progress=None) -> HubReport:
        """Build every checkpoint of ``plan`` ((checkpoint, images it needs)); ``progress(line)`` after each one."""
        ray = self.ray
        report = HubReport(workers=len(self.workers))
        queue, pending, idle = list(plan), {}, list(range(len(self.workers)))
        planned = sum(n for _, n in plan)
        started = time.perf_counter()
        while queue or pending:
            while idle and queue:
                worker, (checkpoint, _) = idle.pop(0), queue.pop(0)
                pending[self.workers[worker].build.remote(checkpoint)] = (worker, checkpoint)
                self.assignments[checkpoint.name] = worker
            [done], _ = ray.wait(list(pending), num_returns=1)
            worker, checkpoint = pending.pop(done)
            idle.append(worker)
            try:
                result = ray.get(done)
            except ray.exceptions.RayError as exc:  # the worker died more than TASK_RETRIES times on it
                result = {
                    "name": checkpoint.name,
                    "state": "failed",
                    "images": 0,
                    "reason": f"worker lost: {str(exc).splitlines()[0][:200]}",
                }
            report.results.append(result)
            report.images += result["images"]
            if result["state"] == "built":
                report.built.append(result["name"])
            else:
                (report.failed if result["state"] == "failed" else report.skipped).append(
                    (result["name"], result["reason"])
                )
            report.seconds = time.perf_counter() - started
            if progress:
                per_image = report.seconds / report.images if report.images else None
                eta = per_image * max(0, planned - report.images) if per_image else None
                progress(
                    f"hub build: {len(report.results)}/{len(plan)} checkpoints, {report.images}/{planned} images, "
                    f"{report.images_per_second or 0:.2f} img/s on {len(self.workers)} worker(s), {format_eta(eta)}"
                    f" (last: {result['name']} {result['state']})"
                )
        return report

    def close(self) -> None:
        for worker in self.workers:
            self.ray.kill(worker)
        if self._started:
            self.ray.shutdown()


def plan_build(args: argparse.Namespace):
    """(engine, [(checkpoint, images to render)], skipped) for the checkpoints whose specs are not ready."""
    from ..cli_options import engine_from_options

    driver_args = argparse.Namespace(**{**vars(args), "models": None})
    gmi, _ = engine_from_options(driver_args)
    source = checkpoint_source(args.models, args.home / HASH_CACHE_FILE)
    listing = source.list_checkpoints()
    by_name = {c.name: c for c in listing.checkpoints}
    plan = gmi.plan(ListedCheckpoints(listing), "missing")
    return gmi, [(by_name[name], images) for name, images in plan.checkpoints if images], listing.skipped


def cmd_hub_build(args: argparse.Namespace) -> int:
    if (args.workers is not None and args.workers < 1) or (args.num_gpus is not None and args.num_gpus < 0):
        raise GmiError("--workers must be >= 1 and --num-gpus >= 0")
    require_ray()
    args.store = args.store.resolve()
    _, plan, skipped = plan_build(args)
    for item in skipped:
        print(f"{item.name}: skipped: {item.reason}", file=sys.stderr)
    print(
        f"hub build: {len(plan)} checkpoint(s), {sum(n for _, n in plan)} image(s) to render into {args.store}",
        file=sys.stderr,
    )
    if not plan:
        print(json.dumps(HubReport().to_dict()) if args.json else "nothing to build: every spec is ready")
        return 0
    hub = HubBuild(engine_options(args), workers=args.workers, num_gpus=args.num_gpus, address=args.ray_address)
    try:
        report = hub.run(plan, progress=lambda line: print(line, file=sys.stderr, flush=True))
    finally:
        hub.close()
    for name, reason in report.failed:
        print(f"{name}: failed: {reason}", file=sys.stderr)
    print(
        json.dumps(report.to_dict(), indent=1)
        if args.json
        else f"built {len(report.built)} spec(s), {report.images} images in {report.seconds:.0f} s"
    )
    return 1 if report.failed else 0


def add_hub_commands(commands, add_engine_options) -> None:
    hub = commands.add_parser("hub", help="model-hub scale: build specs for many checkpoints on a Ray cluster")
    sub = hub.add_subparsers(dest="hub_command", required=True)
    build = sub.add_parser("build", help="build the missing specs of many checkpoints as a Ray job")
    add_engine_options(build)
    build.add_argument(
        "--store", type=Path, required=True, help="the spec store folder every worker writes to (shared)"
    )
    build.add_argument(
        "--num-gpus", type=int, help="GPUs to use, one generator actor each (default: all the cluster has)"
    )
    build.add_argument("--workers", type=int, help="CPU generator actors when there is no GPU (default 1)")
    build.add_argument("--ray-address", help="an existing Ray cluster (ray start --head); default: start a local Ray")
    build.add_argument("--config", type=Path, help="local diffusers config folder (needed offline)")
    build.add_argument("--json", action="store_true")
    build.set_defaults(func=cmd_hub_build)
