"""Messages to the browser (``PromptServer.send_sync``), the node progress bar and the user's interrupt."""

from __future__ import annotations

import logging

log = logging.getLogger("gmi")

BUILD_PLAN = "gmi.build.plan"  # before a build starts: images to render, per checkpoint
BUILD_PROGRESS = "gmi.build.progress"
BUILD_DONE = "gmi.build.done"


def send(event: str, data: dict) -> None:
    from server import PromptServer  # ComfyUI's app module, imported when a message is sent

    instance = getattr(PromptServer, "instance", None)
    if instance is not None:
        try:
            instance.send_sync(event, data)
        except Exception as exc:  # noqa: BLE001 - a closed socket must never break a build
            log.debug("gmi: could not send %s: %s", event, exc)


class NodeProgress:
    """ComfyUI's progress bar for the running node (its update raises when the user interrupts)."""

    def __init__(self, total: int):
        import comfy.utils

        self.bar = comfy.utils.ProgressBar(max(1, total))

    def step(self, n: int = 1) -> None:
        self.bar.update(n)


def check_interrupted() -> None:
    import comfy.model_management as mm

    mm.throw_exception_if_processing_interrupted()


def interrupted() -> bool:
    import comfy.model_management as mm

    return bool(mm.processing_interrupted())
