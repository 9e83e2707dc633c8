"""Spec building as a WebUI job: queue lock, shared.state progress, Interrupt, one job at a time.

Two entry points share :func:`run_build_locked`:
- the tab's button, wrapped by ``call_queue.wrap_gradio_gpu_call`` (which takes the queue lock, calls
  ``shared.state.begin/end`` and registers the task id that the page's ``requestProgress`` polls);
- the HTTP API, which starts :func:`start_build` in a thread that does the same itself.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field

from modules import call_queue, shared

from gmi_core.paths import one_line
from gmi_core.protocols import BuildProgress

from . import runtime

log = logging.getLogger("gmi")

try:  # the WebUI's task registry behind /internal/progress (absent in some forks)
    from modules import progress as webui_progress
except ImportError:  # pragma: no cover
    webui_progress = None


@dataclass
class BuildJob:
    id: str
    which: object
    overrides: dict
    state: str = "queued"  # queued, running, done, failed, cancelled
    message: str = ""
    checkpoint: str = ""
    images_done: int = 0
    images_total: int = 0
    report: dict | None = None
    error: str | None = None
    started: float = field(default_factory=time.time)
    finished: float | None = None

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "state": self.state,
            "which": self.which,
            "message": self.message,
            "checkpoint": self.checkpoint,
            "images_done": self.images_done,
            "images_total": self.images_total,
            "report": self.report,
            "error": self.error,
            "started": self.started,
            "finished": self.finished,
        }


_jobs: dict[str, BuildJob] = {}
_jobs_lock = threading.Lock()


def get_job(job_id: str) -> BuildJob | None:
    return _jobs.get(job_id)


def latest_job() -> BuildJob | None:
    with _jobs_lock:
        return max(_jobs.values(), key=lambda j: j.started, default=None)


def active_job() -> BuildJob | None:
    with _jobs_lock:
        return next((j for j in _jobs.values() if j.state in ("queued", "running")), None)


def planned_prompts(engine, which) -> int:
    """How many generate calls (one per prompt) the build will make; sets the WebUI's job_count."""
    statuses, _ = engine.status(runtime.source())
    if which == "all":
        chosen = statuses
    elif which == "missing":
        chosen = [s for s in statuses if s.state != "ready"]
    else:
        names = set(which)
        chosen = [s for s in statuses if s.name in names]
    total = 0
    for s in chosen:
        resumable = s.state == "partial" and which != "all"
        total += s.prompts_total - (s.prompts_done if resumable else 0)
    return total


def run_build_locked(job: BuildJob) -> dict:
    """Runs a build; the caller holds the queue lock inside shared.state.begin()/end()."""
    state = shared.state
    job.state = "running"
    try:
        with runtime.holding_queue_lock():
            return _run(job, state)
    except Exception as exc:  # noqa: BLE001 - reported to the user, logged in full
        job.state = "failed"
        job.error = one_line(exc)
        log.error("gmi: build failed\n%s", traceback.format_exc())
        return {"built": [], "skipped": [], "failed": [], "cancelled": False, "error": job.error}
    finally:
        if job.state in ("queued", "running"):  # interrupted by something that is not an Exception
            job.state, job.error = "failed", job.error or "build stopped"
        job.finished = time.time()


def _run(job: BuildJob, state) -> dict:
    """The build itself; errors go to run_build_locked."""
    engine = runtime.get_engine(**job.overrides)
    state.job_count = max(1, planned_prompts(engine, job.which))
    state.job_no = 0
    state.textinfo = "gmi: building specs"

    def on_progress(p: BuildProgress) -> None:
        job.checkpoint = p.checkpoint
        job.message = f"{p.checkpoint} ({p.checkpoint_index + 1}/{p.checkpoint_count}): {p.prompts_done}/{p.prompts_total} prompts"
        job.images_done, job.images_total = p.images_done, p.images_total
        state.textinfo = "gmi: " + job.message

    report = engine.build(
        runtime.source(),
        runtime.generator(),
        which=job.which,
        progress=on_progress,
        should_cancel=lambda: bool(state.interrupted),
    )
    job.report = report.to_dict()
    job.state = "cancelled" if report.cancelled else "done"
    if report.failed and not report.built and not report.cancelled:
        job.state = "failed"
        job.error = "; ".join(f"{n}: {r}" for n, r in report.failed)
    return job.report


def new_job(which, overrides: dict | None = None, job_id: str | None = None) -> BuildJob:
    job = BuildJob(id=job_id or f"task(gmi-build-{uuid.uuid4().hex[:10]})", which=which, overrides=dict(overrides or {}))
    with _jobs_lock:
        for old in [k for k, j in _jobs.items() if j.finished and time.time() - j.finished > 3600]:
            del _jobs[old]
        _jobs[job.id] = job
    return job


def _run_in_queue(job: BuildJob) -> None:
    try:
        _run_queued(job)
    finally:  # whatever happened, the job leaves queued/running, so status and "busy" stay true
        if not job.finished:
            job.state, job.error, job.finished = "failed", job.error or "build did not start", time.time()


def _run_queued(job: BuildJob) -> None:
    if webui_progress is not None:
        webui_progress.add_task_to_queue(job.id)
    with call_queue.queue_lock:
        shared.state.begin(job=job.id)
        if webui_progress is not None:
            webui_progress.start_task(job.id)
        try:
            run_build_locked(job)
        finally:
            if webui_progress is not None:
                webui_progress.finish_task(job.id)
            shared.state.end()
            shared.state.interrupted = False


def start_build(which="missing", overrides: dict | None = None, wait: bool = False) -> BuildJob:
    """Queue a build behind other WebUI jobs; returns at once unless ``wait``. One gmi build at a time."""
    with _start_lock:
        running = active_job()
        if running is not None:
            raise BuildBusy(f"a gmi build is already {running.state} ({running.id})")
        job = new_job(which, overrides)
    if wait:
        _run_in_queue(job)
    else:
        threading.Thread(target=_run_in_queue, args=(job,), name=f"gmi-build-{job.id}", daemon=True).start()
    return job


class BuildBusy(RuntimeError):
    """Another gmi build is queued or running."""


_start_lock = threading.Lock()
