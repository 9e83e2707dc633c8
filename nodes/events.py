"""Messages to the browser (``PromptServer.send_sync``) and the node progress bar; no-ops outside ComfyUI."""

from __future__ import annotations

import logging

log = logging.getLogger("gmi")

BUILD_PLAN = "gmi.build.plan"  # before a build starts: images to render, per checkpoint
BUILD_PROGRESS = "gmi.build.progress"
BUILD_DONE = "gmi.build.done"


def send(event: str, data: dict) -> None:
    try:
        from server import PromptServer
    except ImportError:
        return
    instance = getattr(PromptServer, "instance", None)
    if instance is not None:
        try:
            instance.send_sync(event, data)
        except Exception as exc:  # noqa: BLE001 - a closed socket must never break a build
            log.debug("gmi: could not send %s: %s", event, exc)


class NodeProgress:
    """ComfyUI's progress bar for the running node (its update raises when the user interrupts)."""

    def __init__(self, total: int):
        self.bar = None
        try:
            import comfy.utils

            self.bar = comfy.utils.ProgressBar(max(1, total))
        except ImportError:
            pass

    def step(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)


def check_interrupted() -> None:
    try:
        import comfy.model_management as mm
    except ImportError:
        return
    mm.throw_exception_if_processing_interrupted()


def interrupted() -> bool:
    try:
        import comfy.model_management as mm
    except ImportError:
        return False
    return bool(mm.processing_interrupted())
