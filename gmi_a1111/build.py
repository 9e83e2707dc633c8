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
from gmi_core.protocols import BuildProgress, format_eta

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
    images_planned: int | None = None  # known before the first image renders
    images_rendered: int = 0
    seconds_per_image: float | None = None
    eta_s: float | None = None
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
            "images_planned": self.images_planned,
            "images_rendered": self.images_rendered,
            "seconds_per_image": self.seconds_per_image,
            "eta_s": self.eta_s,
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
    plan = engine.plan(runtime.source(), job.which)
    job.images_planned = plan.images
    job.message = f"budget {plan.budget}: {plan.images} images to render"
    state.job_count = max(1, plan.generate_calls)
    state.job_no = 0
    state.textinfo = "gmi: " + job.message

    def on_progress(p: BuildProgress) -> None:
        job.checkpoint = p.checkpoint
        job.images_done, job.images_total = p.images_done, p.images_total
        job.images_rendered, job.seconds_per_image, job.eta_s = p.images_rendered, p.seconds_per_image, p.eta_s
        job.message = (
            f"{p.checkpoint} ({p.checkpoint_index + 1}/{p.checkpoint_count}): {p.images_done}/{p.images_total} images; "
            f"build {p.images_rendered}/{p.images_planned}, {format_eta(p.eta_s)}"
        )
        state.textinfo = "gmi: " + job.message

    report = engine.build(
        None, runtime.generator(), plan=plan, progress=on_progress, should_cancel=lambda: bool(state.interrupted)
    )
    job.report = report.to_dict()
    job.state = "cancelled" if report.cancelled else "done"
    if report.failed and not report.built and not report.cancelled:
        job.state = "failed"
        job.error = "; ".join(f"{n}: {r}" for n, r in report.failed)
    return job.report


def new_job(which, overrides: dict | None = None, job_id: str | None = None) -> BuildJob:
    job = BuildJob(
        id=job_id or f"task(gmi-build-{uuid.uuid4().hex[:10]})", which=which, overrides=dict(overrides or {})
    )
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
