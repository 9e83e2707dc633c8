"""Refine from the ``/gmi/identify`` route (``refine=contenders``): the Identify node's refine, outside a node.

The route renders with the same code as the node (:func:`identify_node.refine_with_comfyui`: ComfyUI's own loader,
LoRA loader, sampler and VAE, the panel's progress events with ETA), but it runs in a route's worker thread, not in
ComfyUI's prompt queue, so it keeps out of the queue's way: it is refused (409) while the queue runs or holds a prompt,
one route refine runs at a time, and a prompt queued while it renders stops it after the images of the prompt it is on
(the two share the device for that long; ComfyUI's Cancel button stops it sooner, inside the sampler): the rendered
images are kept and the answer is the ranking over what the specs hold.
"""

from __future__ import annotations

import threading

from ..gmi_core.errors import Busy, Cancelled
from . import engines, events
from .host import ComfyGenerator
from .identify_node import refine_with_comfyui

_RUNNING = threading.Lock()


def queue_busy() -> bool:
    """True while ComfyUI's prompt queue runs or holds a prompt."""
    from server import PromptServer

    queue = getattr(getattr(PromptServer, "instance", None), "prompt_queue", None)
    return queue is not None and queue.get_tasks_remaining() > 0


def stopped() -> bool:
    """The refine's cancel check: ComfyUI's Cancel button, or a prompt waiting for the GPU."""
    return events.interrupted() or queue_busy()


class StopOnInterrupt:
    """A :class:`ComfyGenerator` whose sampler interrupt ends the refine as a cancel (the rendered images kept, the
    ranking answered): ComfyUI clears its interrupt flag as it raises, so the refine could not tell it otherwise."""

    def __init__(self, generator: ComfyGenerator):
        self.generator = generator

    def generate(self, *args, **kwargs):
        import comfy.model_management as mm

        try:
            return self.generator.generate(*args, **kwargs)
        except mm.InterruptProcessingException:
            raise Cancelled("refine interrupted (ComfyUI's Cancel)") from None

    def release(self) -> None:
        self.generator.release()


def refine(engine, images, source, prompt, method, include_not_installed: bool, max_images: int):
    """:func:`refine_with_comfyui` when the queue is idle (else :class:`Busy`); ends the panel's progress display."""
    import comfy.model_management as mm

    if not _RUNNING.acquire(blocking=False):
        raise Busy("a refine from /gmi/identify is already running; ask again when it has answered")
    try:
        if queue_busy():
            raise Busy(
                "ComfyUI's queue is running a prompt; refine when it is idle (or use the Identify node's refine)"
            )
        mm.interrupt_current_processing(False)  # a Cancel pressed earlier is no request to stop this refine
        generator = StopOnInterrupt(ComfyGenerator(hash_cache=engines.hash_cache()))
        refined = refine_with_comfyui(
            engine, images, source, prompt, method, include_not_installed, max_images, False, stopped, generator
        )
        summary = refined.summary()
        events.send(
            events.BUILD_DONE,
            {
                "built": [c["name"] for c in summary["checkpoints"] if c["images_rendered"]],
                "failed": summary["failed"],
                "cancelled": summary["cancelled"],
            },
        )
        return refined
    finally:
        _RUNNING.release()
