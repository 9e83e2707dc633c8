"""HTTP API under /gmi/v1/ (registered by scripts/gmi_api.py through on_app_started).

GET  /gmi/v1/specs              checkpoints with their spec state, skipped files with the reason, the build job
POST /gmi/v1/build              start a build: {"checkpoints": "missing"|"all"|[names], overrides..., "wait": false}
GET  /gmi/v1/build[/{job_id}]   a build job's state and report
POST /gmi/v1/identify           {"image": b64 | "images": [b64...], "prompt"?, "top_k"?, "method"?, "thumbnails"?}
POST /gmi/v1/interrogate        {"image"|"images"} -> {"prompt"}
POST /gmi/v1/switch             {"checkpoint": name | title | short hash | sha256}
"""

from __future__ import annotations

import base64
import binascii
import functools
import logging

from modules import sd_models
from pydantic import BaseModel, Field

from gmi_core.errors import CheckpointError, EncoderUnavailable, GmiError, ImageError, NoSpecsError
from gmi_core.images import load_image
from gmi_core.ranker import METHODS

from . import build, host, runtime

log = logging.getLogger("gmi")
PREFIX = "/gmi/v1"
MAX_IMAGES = 16
MAX_IMAGE_BYTES = 32 * 1024 * 1024


class HTTPException(Exception):
    """Raised by the handlers; turned into FastAPI's HTTPException at registration (keeps them testable)."""

    def __init__(self, status_code: int, detail: str):
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail


class BuildRequest(BaseModel):
    checkpoints: str | list[str] = Field("missing", description='"missing", "all" or a list of checkpoint names/titles')
    images_per_prompt: int | None = Field(None, ge=1, le=64)
    steps: int | None = Field(None, ge=1, le=150)
    cfg: float | None = Field(None, ge=0, le=30)
    width: int | None = Field(None, ge=64, le=2048)
    height: int | None = Field(None, ge=64, le=2048)
    sampler: str | None = None
    scheduler: str | None = None
    prompt_set: str | None = None
    wait: bool = False


class IdentifyRequest(BaseModel):
    image: str | None = Field(None, description="base64 image (a data: URI prefix is accepted)")
    images: list[str] | None = None
    prompt: str | None = Field(None, max_length=2000)
    top_k: int | None = Field(None, ge=1, le=1000)
    method: str | None = None
    thumbnails: bool = False


class InterrogateRequest(BaseModel):
    image: str | None = None
    images: list[str] | None = None


class SwitchRequest(BaseModel):
    checkpoint: str = Field(..., min_length=1, max_length=1000)


def decode_images(single: str | None, many: list[str] | None) -> list:
    encoded = ([single] if single else []) + list(many or [])
    if not encoded:
        raise HTTPException(422, "give a base64 image in 'image' or a list in 'images'")
    if len(encoded) > MAX_IMAGES:
        raise HTTPException(422, f"at most {MAX_IMAGES} images")
    images = []
    for index, text in enumerate(encoded):
        if "," in text[:100] and text.startswith("data:"):
            text = text.split(",", 1)[1]
        if len(text) > MAX_IMAGE_BYTES * 4 // 3 + 4:
            raise HTTPException(413, f"image {index} is too large")
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise HTTPException(422, f"image {index} is not valid base64") from None
        try:
            images.append(load_image(raw, name=f"image {index}"))
        except ImageError as exc:
            raise HTTPException(422, str(exc)) from None
    return images


def resolve_names(names: list[str]) -> list[str]:
    """Checkpoint names as gmi knows them, resolved only through the WebUI's own list."""
    out = []
    for name in names:
        try:
            out.append(host.resolve_checkpoint(name).name)
        except CheckpointError as exc:
            raise HTTPException(404, str(exc)) from None
    return out


def _gmi_errors(exc: Exception) -> HTTPException:
    if isinstance(exc, EncoderUnavailable):
        return HTTPException(503, str(exc))
    if isinstance(exc, NoSpecsError):
        return HTTPException(409, str(exc))
    if isinstance(exc, CheckpointError):
        return HTTPException(404, str(exc))
    return HTTPException(400, str(exc))


def specs():
    try:
        data = runtime.status()
    except GmiError as exc:
        raise _gmi_errors(exc) from None
    job = build.latest_job()
    data["build"] = job.to_dict() if job else None
    return data


def start_build(req: BuildRequest):
    which = req.checkpoints
    if isinstance(which, str):
        if which not in ("missing", "all"):
            which = resolve_names([which])
    else:
        if not which:
            raise HTTPException(422, "empty checkpoint list")
        which = resolve_names(which)
    fields = req.model_dump() if hasattr(req, "model_dump") else req.dict()
    overrides = {k: v for k, v in fields.items() if k not in ("checkpoints", "wait") and v is not None}
    try:
        runtime.get_engine(**overrides)  # fail fast (encoder, prompt set) before queueing
        job = build.start_build(which, overrides, wait=req.wait)
    except build.BuildBusy as exc:
        raise HTTPException(409, str(exc)) from None
    except GmiError as exc:
        raise _gmi_errors(exc) from None
    return job.to_dict()


def build_status(job_id: str | None = None):
    job = build.get_job(job_id) if job_id else build.latest_job()
    if job is None:
        raise HTTPException(404, f"no build job {job_id}" if job_id else "no build has run")
    return job.to_dict()


def identify(req: IdentifyRequest):
    images = decode_images(req.image, req.images)
    if req.method is not None and req.method not in METHODS:
        raise HTTPException(422, f"unknown method {req.method!r}; one of {', '.join(METHODS)}")
    try:
        _, data = runtime.identify(images, req.prompt, req.method, req.top_k, thumbnails=req.thumbnails)
    except GmiError as exc:
        raise _gmi_errors(exc) from None
    return data


def interrogate(req: InterrogateRequest):
    images = decode_images(req.image, req.images)
    try:
        return {"prompt": runtime.get_engine().interrogate(images)}
    except GmiError as exc:
        raise _gmi_errors(exc) from None


def switch(req: SwitchRequest):
    try:
        info = host.resolve_checkpoint(req.checkpoint)
        title = host.switch_to_title(info.title)
    except CheckpointError as exc:
        raise HTTPException(404, str(exc)) from None
    loaded = getattr(getattr(sd_models, "model_data", None), "sd_model", None)
    return {"title": title, "name": info.name, "loaded": getattr(getattr(loaded, "sd_checkpoint_info", None), "title", None)}


def _route(handler):
    import fastapi

    @functools.wraps(handler)
    def wrapped(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except HTTPException as exc:
            raise fastapi.HTTPException(exc.status_code, exc.detail) from None

    return wrapped


ROUTES = [
    ("/specs", specs, "GET"),
    ("/build", start_build, "POST"),
    ("/build", build_status, "GET"),
    ("/build/{job_id}", build_status, "GET"),
    ("/identify", identify, "POST"),
    ("/interrogate", interrogate, "POST"),
    ("/switch", switch, "POST"),
]


def register(app) -> None:
    for path, handler, method in ROUTES:
        app.add_api_route(PREFIX + path, _route(handler), methods=[method])


def on_app_started(_demo, app) -> None:
    if any(getattr(r, "path", "") == f"{PREFIX}/specs" for r in app.routes):
        return  # UI reload: routes already there
    register(app)
    runtime.warm_in_background()  # a daemon thread: never delays the UI
