"""Identify with refine of the contenders in the WebUI: the contenders' missing spec images are rendered with the
WebUI's own pipeline, as a job (queue lock, shared.state progress text with ETA, Interrupt keeps what it rendered).

The tab's Refine button runs :func:`refine_identify` inside ``call_queue.wrap_gradio_gpu_call`` (which holds the
queue lock); the HTTP API's ``"refine": true`` runs :func:`refine_in_queue`, which takes the lock itself.
"""

from __future__ import annotations

from modules import call_queue, shared

from gmi_core import service
from gmi_core.protocols import BuildProgress, format_eta

from . import runtime


def refine_identify(images, prompt=None, method=None, top_k=None, thumbnails=False, max_images=None):
    """(RefineResult, the shared identify payload with its ``refine`` section); the caller holds the queue lock."""
    state = shared.state
    engine = runtime.get_engine()

    def progress(p: BuildProgress) -> None:
        state.job_count, state.job_no = max(1, p.images_planned), p.images_rendered
        state.textinfo = (
            f"gmi refine: {p.checkpoint} ({p.checkpoint_index + 1}/{p.checkpoint_count}), "
            f"{p.images_rendered}/{p.images_planned} images, {format_eta(p.eta_s)}"
        )

    with runtime.holding_queue_lock():
        refined = service.refine(
            engine,
            images,
            runtime.source(),
            runtime.generator(),
            prompt,
            method or str(runtime.opt("gmi_method")),
            bool(runtime.opt("gmi_include_not_installed")),
            max_images=max_images,
            progress=progress,
            should_cancel=lambda: bool(state.interrupted),
        )
    data = service.refine_payload(
        refined,
        service.data_uri_thumbnails(engine) if thumbnails else None,
        runtime.titles_by_sha(),
        top_k=top_k or int(runtime.opt("gmi_top_k")),
    )
    return refined, data


def refine_in_queue(images, prompt=None, method=None, top_k=None, thumbnails=False, max_images=None):
    """:func:`refine_identify` behind the WebUI's other jobs (the HTTP API)."""
    with call_queue.queue_lock:
        shared.state.begin(job="gmi-refine")
        try:
            return refine_identify(images, prompt, method, top_k, thumbnails, max_images)
        finally:
            shared.state.end()
            shared.state.interrupted = False
