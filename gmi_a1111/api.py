"""HTTP API under /gmi/v1/ (registered by scripts/gmi_api.py through on_app_started).

GET  /gmi/v1/specs              checkpoints with their spec state, skipped files with the reason, the build job
POST /gmi/v1/build              start a build: {"checkpoints": "missing"|"all"|[names], overrides..., "wait": false}
GET  /gmi/v1/build[/{job_id}]   a build job's state and report
POST /gmi/v1/identify           {"image": b64 | "images": [b64...], "prompt"?, "top_k"?, "method"?, "thumbnails"?,
                                 "refine"?, "refine_max_images"?}
POST /gmi/v1/interrogate        {"image"|"images"} -> {"prompt"}
POST /gmi/v1/switch             {"checkpoint": name | title | short hash | sha256, "modules"?: [Forge VAE/TE files]}
POST /gmi/v1/import-images      {"root": "outputs"|"models", "subfolder": ""} -> observed specs from images on disk
GET  /gmi/v1/map                near-duplicate groups and 2-D coordinates of the checkpoints with specs
GET  /gmi/v1/defaults           every generation default and limit (gmi_core.service.defaults_payload)

Access: the routes carry the same dependencies as the WebUI's own /sdapi/v1/ routes (its --api-auth check),
and exist only when the WebUI serves its API (--api or --nowebui). Request bodies are read with a byte limit
(also chunked ones); errors are one line without server paths; JSON never holds NaN.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import logging

from pydantic import BaseModel, Field, StrictStr

from gmi_core import limits, service
from gmi_core.budgets import parse_budget
from gmi_core.errors import GmiError, ImageError, InvalidInput
from gmi_core.images import load_image
from gmi_core.paths import one_line
from gmi_core.ranker import METHODS

from . import build, forge, host, library, runtime

log = logging.getLogger("gmi")
PREFIX = "/gmi/v1"
MAX_REQUEST_BYTES = limits.MAX_UPLOAD_BYTES * 4 // 3 + 64 * 1024  # base64 images inside JSON


class HTTPException(Exception):
    """Raised by the handlers; turned into FastAPI's HTTPException at registration (keeps them testable)."""

    def __init__(self, status_code: int, detail: str):
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail


class BuildRequest(BaseModel):
    checkpoints: StrictStr | list[StrictStr] = Field(
        "missing", description='"missing", "all" or a list of checkpoint names/titles/sha256'
    )
    budget: str | None = Field(
        None, max_length=40, description="quick, standard, full or PROMPTSxIMAGES (default: the setting)"
    )
    steps: int | None = Field(None, ge=1, le=limits.MAX_STEPS, description="every family (default: per family)")
    cfg: float | None = Field(None, ge=0, le=limits.MAX_CFG, description="every family")
    width: int | None = Field(None, ge=limits.MIN_SIZE, le=limits.MAX_SIZE, description="every family")
    height: int | None = Field(None, ge=limits.MIN_SIZE, le=limits.MAX_SIZE, description="every family")
    sampler: str | None = Field(None, max_length=100)
    scheduler: str | None = Field(None, max_length=100)
    prompt_set: str | None = Field(None, max_length=1000)
    wait: bool = False


class IdentifyRequest(BaseModel):
    image: str | None = Field(None, description="base64 image (a data: URI prefix is accepted)")
    images: list[str] | None = None
    prompt: str | None = Field(None, max_length=limits.MAX_TEXT_FIELD)
    top_k: int | None = Field(None, ge=1, le=limits.MAX_TOP_K)
    method: str | None = Field(None, max_length=100)
    thumbnails: bool = False
    refine: bool = Field(False, description="ambiguous ranking: render the contenders' missing spec images, rank again")
    refine_max_images: int | None = Field(None, ge=1, le=limits.MAX_TOP_K, description="images refine renders at most")


class InterrogateRequest(BaseModel):
    image: str | None = None
    images: list[str] | None = None


class SwitchRequest(BaseModel):
    checkpoint: StrictStr = Field(..., min_length=1, max_length=1000)
    modules: list[StrictStr] | None = Field(
        None, max_length=8, description="Forge: VAE / text encoder file names to load with it (default: keep)"
    )


def decode_images(single: str | None, many: list[str] | None) -> list:
    encoded = ([single] if single else []) + list(many or [])
    if not encoded:
        raise HTTPException(422, "give a base64 image in 'image' or a list in 'images'")
    if len(encoded) > limits.MAX_IMAGES_PER_REQUEST:
        raise HTTPException(422, f"at most {limits.MAX_IMAGES_PER_REQUEST} images per request")
    images = []
    for index, text in enumerate(encoded):
        if "," in text[:100] and text.startswith("data:"):
            text = text.split(",", 1)[1]
        if len(text) > limits.MAX_UPLOAD_BYTES * 4 // 3 + 4:
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
        except GmiError as exc:  # unknown: 404; ambiguous: 400 listing the candidates
            raise _gmi_errors(exc) from None
    return out


def _gmi_errors(exc: Exception) -> HTTPException:
    """gmi's one mapping (:func:`gmi_core.service.http_status`); an undecodable image is 422 here, as FastAPI
    answers a malformed body. The detail is one line without server paths."""
    return HTTPException(422 if isinstance(exc, ImageError) else service.http_status(exc), one_line(exc))


def check_overrides(overrides: dict) -> None:
    """The build numbers and names through gmi's one validation, with the samplers this WebUI knows."""
    config = runtime.Config.from_opts(**overrides)
    parse_budget(config.budget)  # a malformed budget is the request's fault (4xx), not a failed job
    names = host.sampler_names()
    for _, row in config.settings.rows:
        limits.check_settings(host.webui_sampling(row, names), *names)
    runtime.get_prompt_set(config.prompt_set, from_request=bool(overrides.get("prompt_set")))


def specs():
    try:
        data = runtime.status(wait=False)  # a poll never queues behind a build
    except (GmiError, OSError) as exc:
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
        check_overrides(
            overrides
        )  # fail fast (numbers, names, prompt set) before queueing; the encoder loads in the job
        job = build.start_build(which, overrides, wait=req.wait)
    except build.BuildBusy as exc:
        raise HTTPException(409, f"busy: {exc}") from None
    except (GmiError, OSError) as exc:
        raise _gmi_errors(exc) from None
    return limits.json_safe(job.to_dict())


def build_status(job_id: str | None = None):
    job = build.get_job(job_id) if job_id else build.latest_job()
    if job is None:
        raise HTTPException(404, f"no build job {job_id[:100]}" if job_id else "no build has run")
    return limits.json_safe(job.to_dict())


def identify(req: IdentifyRequest):
    images = decode_images(req.image, req.images)
    if req.method is not None and req.method not in METHODS:
        raise HTTPException(422, f"unknown method {req.method!r}; one of {', '.join(METHODS)}")
    try:
        if req.refine:
            from .refine import refine_in_queue

            _, data = refine_in_queue(
                images, req.prompt, req.method, req.top_k, thumbnails=req.thumbnails, max_images=req.refine_max_images
            )
        else:
            _, data = runtime.identify(images, req.prompt, req.method, req.top_k, thumbnails=req.thumbnails)
    except (GmiError, OSError) as exc:
        raise _gmi_errors(exc) from None
    return limits.json_safe(data)


def interrogate(req: InterrogateRequest):
    images = decode_images(req.image, req.images)
    try:
        return {"prompt": runtime.get_engine().interrogate(images)}
    except (GmiError, OSError) as exc:
        raise _gmi_errors(exc) from None


def switch(req: SwitchRequest):
    running = build.active_job()
    if running is not None:  # the switch would wait behind the whole build: refuse now instead
        raise HTTPException(409, f"busy: a gmi build is {running.state} ({running.id}); switch when it has finished")
    try:
        info = host.resolve_checkpoint(req.checkpoint)
        title = host.switch_to_title(info.title, req.modules)
    except LookupError as exc:  # Forge: a module file it does not have
        raise HTTPException(404, one_line(exc)) from None
    except GmiError as exc:  # unknown: 404; ambiguous: 400 listing the candidates
        raise _gmi_errors(exc) from None
    return {
        "title": title,
        "name": info.name,
        "loaded": forge.loaded_title(),  # Forge loads the new checkpoint at the next generation
        "selected": forge.selected_title(),
        "modules": forge.selected_modules(),
    }


class ImportImagesRequest(BaseModel):
    root: str = Field("outputs", max_length=20, description="outputs | models (the WebUI's folders only)")
    subfolder: str = Field("", max_length=500, description="relative folder inside root; scanned recursively")


def import_images(req: ImportImagesRequest) -> dict:
    try:
        return library.import_images_report(req.root, req.subfolder)
    except (GmiError, OSError) as exc:
        raise _gmi_errors(exc) from None


def library_map() -> dict:
    try:
        return library.groups_report()
    except (GmiError, OSError) as exc:
        raise _gmi_errors(exc) from None


def defaults() -> dict:
    return service.defaults_payload()


def _route(handler):
    import fastapi

    @functools.wraps(handler)
    def wrapped(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except HTTPException as exc:
            raise fastapi.HTTPException(exc.status_code, exc.detail) from None
        except Exception as exc:
            log.exception("gmi: unexpected error in %s", handler.__name__)
            raise fastapi.HTTPException(500, f"internal error ({type(exc).__name__}); see the WebUI console") from None

    return wrapped


def limited_body_route():
    """An APIRoute that reads the request body with a counted limit before FastAPI parses it (chunked too)."""
    from fastapi.responses import JSONResponse
    from fastapi.routing import APIRoute

    class LimitedBodyRoute(APIRoute):
        def get_route_handler(self):
            handler = super().get_route_handler()

            async def limited(request):
                if request.method == "POST":
                    declared = request.headers.get("content-length", "")
                    try:
                        if declared.isdigit() and int(declared) > MAX_REQUEST_BYTES:
                            raise limits.UploadTooLarge("request body too large")
                        counter = limits.ByteCounter(MAX_REQUEST_BYTES)
                        request._body = b"".join([counter.add(chunk) async for chunk in request.stream()])
                    except limits.UploadTooLarge:
                        return JSONResponse(
                            {"detail": f"request body larger than {MAX_REQUEST_BYTES // (1024 * 1024)} MiB"},
                            status_code=413,
                        )
                    try:
                        limits.check_json_depth(request._body)  # before FastAPI's parser recurses into it
                    except InvalidInput as exc:
                        return JSONResponse({"detail": str(exc)}, status_code=422)
                    if not_a_json_number(request._body):
                        return JSONResponse({"detail": "NaN and Infinity are not JSON numbers"}, status_code=422)
                return await handler(request)

            return limited

    return LimitedBodyRoute


def not_a_json_number(body: bytes) -> bool:
    """Python's JSON reader accepts NaN/Infinity, which would then break FastAPI's own error answer (a 500)."""
    if not any(token in body for token in (b"NaN", b"Infinity")):
        return False

    def refuse(constant):
        raise OverflowError(constant)

    try:
        json.loads(body, parse_constant=refuse)
    except OverflowError:
        return True
    except ValueError:
        return False  # other JSON errors: FastAPI answers 422 itself
    return False


def auth_dependencies(app) -> list | None:
    """The dependencies of the WebUI's /sdapi/v1/ routes (its --api-auth check), or None when it serves no API.

    The WebUI adds ``Depends(api.auth)`` to each of its routes when --api-auth is given; gmi reuses exactly
    those. If --api-auth is set but no such route is found, gmi fails closed with the same check.
    """
    for route in getattr(app, "routes", []):
        if str(getattr(route, "path", "")).startswith("/sdapi/v1/"):
            return list(getattr(route, "dependencies", None) or [])
    cmd_opts = shared_cmd_opts()
    if getattr(cmd_opts, "api_auth", None):
        return [_fallback_auth(cmd_opts.api_auth)]
    if getattr(cmd_opts, "api", False) or getattr(cmd_opts, "nowebui", False):
        return []
    return None


def shared_cmd_opts():
    from modules import shared

    return getattr(shared, "cmd_opts", None)


def _fallback_auth(api_auth: str):
    """The WebUI's Api.auth, for the case its routes cannot be found: HTTP Basic against --api-auth."""
    from secrets import compare_digest

    from fastapi import Depends
    from fastapi import HTTPException as FastapiHTTPException
    from fastapi.security import HTTPBasic, HTTPBasicCredentials

    credentials = dict(item.split(":", 1) for item in api_auth.split(",") if ":" in item)
    basic = Depends(HTTPBasic())

    def auth(given: HTTPBasicCredentials = basic):
        expected = credentials.get(given.username)
        if expected is not None and compare_digest(given.password, expected):
            return True
        raise FastapiHTTPException(401, "Incorrect username or password", headers={"WWW-Authenticate": "Basic"})

    return Depends(auth)


ROUTES = [
    ("/specs", specs, "GET"),
    ("/build", start_build, "POST"),
    ("/build", build_status, "GET"),
    ("/build/{job_id}", build_status, "GET"),
    ("/identify", identify, "POST"),
    ("/interrogate", interrogate, "POST"),
    ("/switch", switch, "POST"),
    ("/import-images", import_images, "POST"),
    ("/map", library_map, "GET"),
    ("/defaults", defaults, "GET"),
]


def register(app) -> bool:
    """Adds the routes with the WebUI's own API dependencies; none when the WebUI serves no API."""
    dependencies = auth_dependencies(app)
    if dependencies is None:
        log.info("gmi: the WebUI runs without --api, so the /gmi/v1 API is not served")
        return False
    route_class = limited_body_route()
    for path, handler, method in ROUTES:
        app.router.add_api_route(
            PREFIX + path,
            _route(handler),
            methods=[method],
            dependencies=dependencies,
            route_class_override=route_class,
        )
    return True


def on_app_started(_demo, app) -> None:
    if any(getattr(r, "path", "") == f"{PREFIX}/specs" for r in app.routes):
        return  # UI reload: routes already there
    register(app)
    runtime.warm_in_background()  # a daemon thread: never delays the UI
