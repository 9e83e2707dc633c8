"""HTTP routes under /gmi/ (also served under /api/gmi/): status, options, defaults, identify upload, thumbnails.

Thin translations of :mod:`gmi_core.service` (the same payloads as the A1111 API).

Access control: the routes are added to ``PromptServer.routes``, the table ComfyUI itself serves, so every
middleware ComfyUI applies to its own routes applies to them too (its origin check against cross-site
requests, CORS only when --enable-cors-header, whatever a front proxy or --tls setup adds). gmi adds no
access path ComfyUI does not have.

Checkpoints are named only through ``folder_paths``; prompt sets and encoder files only inside gmi's
folders; spec thumbnails only from the spec store, addressed by validated keys. Uploads are counted while
they are read (also chunked ones), and images are decoded off the event loop, after their header passed
the pixel limit. Error bodies are one line without server paths; JSON never holds NaN.
"""

from __future__ import annotations

import asyncio
import logging
import re

from ..gmi_core import limits, service
from ..gmi_core.errors import (
    EncoderLoading,
    EncoderUnavailable,
    InvalidInput,
    NotFound,
    SpecError,
)
from ..gmi_core.images import load_image, png_bytes
from ..gmi_core.loras import MODEL_KINDS
from ..gmi_core.observed import OBSERVED
from ..gmi_core.paths import one_line, redact
from ..gmi_core.prompts import DEFAULT_PROMPT_SET
from ..gmi_core.protocols import ListedCheckpoints
from ..gmi_core.ranker import DEFAULT_METHOD, METHODS
from ..gmi_core.refine import REFINE_MODES
from ..gmi_core.spec import SpecKey
from . import engines, loras, route_refine, settings
from .build_node import build_inputs, sampler_choices
from .identify_node import thumbnail_urls

log = logging.getLogger("gmi")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_ID = re.compile(r"[A-Za-z0-9._/\-\[\]:]{1,200}")
_FIELDS = {
    "encoder",
    "prompt_set",
    "max_prompts",
    "method",
    "prompt",
    "top_k",
    "include_not_installed",
    "models",
    "refine",
    "refine_max_images",
}


def _count(name: str, value, default: int, allow_zero: bool = True) -> int:
    """A request's whole number: absent -> default, 0 allowed where it means "all"; else InvalidInput."""
    if value is None or value == "":
        return default
    if allow_zero and str(value).strip() == "0":
        return 0
    return limits.check_number(name, value)  # each number its own range (the validation table)


def _flag(name: str, value) -> bool:
    """A request's on/off field: absent, 0/false -> False; 1/true -> True; else InvalidInput."""
    text = str(value if value is not None else "").strip().lower()
    if text in ("", "0", "false"):
        return False
    if text in ("1", "true"):
        return True
    raise InvalidInput(f"{name} must be true or false, not {text[:40]!r}")


def status_config(query) -> dict:
    """The panel's saved build settings with the request's overrides, every value checked."""
    config = settings.load()
    for key, default in settings.DEFAULTS.items():
        if key not in query:
            continue
        value = query[key]
        if isinstance(default, int):
            config[key] = _count(key, value, default)
        elif isinstance(default, float):
            config[key] = float(limits.check_number(key, value))
        else:
            config[key] = str(value)[: limits.MAX_TEXT_FIELD]
    config["models"] = choice("models", config["models"], MODEL_KINDS, settings.DEFAULTS["models"])
    return config


def choice(name: str, value, options: tuple[str, ...], default: str) -> str:
    """A request's pick from ``options`` (absent -> ``default``); else InvalidInput naming the options."""
    if value is None or value == "":
        return default
    if value not in options:
        raise InvalidInput(f"{name} must be one of {', '.join(options)}, not {str(value)[:40]!r}")
    return value


def family_settings(config: dict):
    """The panel's per-family build settings, every value checked against the host's samplers and limits."""
    samplers, schedulers = sampler_choices()
    per_family = settings.family_settings(config["family_settings"], config["sampler_name"], config["scheduler"])
    for _, row in per_family.rows:
        limits.check_settings(row, samplers, schedulers)
    return per_family


def status_payload(config: dict) -> dict:
    """Per-model spec state for the panel (checkpoints and LoRA specs, as ``config["models"]`` filters), for the given
    (or the last used) build settings: the rows its "Build missing" renders."""
    per_family = family_settings(config)
    try:
        encoder = engines.get_encoder(config["encoder"], wait=False)  # a poll never waits for a load
    except EncoderLoading as exc:
        return service.status_loading_payload(config, exc)
    prompts = engines.get_prompt_set(config["prompt_set"], config["max_prompts"])
    engine = engines.get_engine(encoder, prompts, config["budget"], per_family, config["seed"])
    return service.status_payload(
        engine,
        loras.configured_source(config, config["models"]),
        config,
        empty_note=(
            "the checkpoints folders hold no checkpoint files; put Stable Diffusion checkpoints in models/checkpoints"
            + ("" if config["models"] == "checkpoints" else " (and LoRAs for them in models/loras)")
        ),
    )


def identify_payload(raw_images: list[tuple[str, bytes]], fields: dict) -> dict:
    """Runs in a worker thread: every field checked, then decodes (header checked first), then ranks the models
    (``models``: checkpoints, LoRA specs or both, as the Identify node), refining the contenders when asked."""
    top_k = _count("top_k", fields.get("top_k"), 0)
    max_prompts = _count("max_prompts", fields.get("max_prompts"), 0)
    include_not_installed = _flag("include_not_installed", fields.get("include_not_installed"))
    method = choice("method", fields.get("method"), METHODS, DEFAULT_METHOD)
    models = choice("models", fields.get("models"), MODEL_KINDS, settings.DEFAULTS["models"])
    refine = choice("refine", fields.get("refine"), REFINE_MODES, "off")
    refine_max_images = _count("refine_max_images", fields.get("refine_max_images"), 0)
    images = [load_image(data, name=f"image {i + 1}") for i, (_, data) in enumerate(raw_images)]
    config = settings.load()
    encoder = engines.get_encoder(fields.get("encoder") or config["encoder"])
    prompts = engines.get_prompt_set(fields.get("prompt_set") or DEFAULT_PROMPT_SET, max_prompts)
    engine = engines.get_engine(encoder, prompts)
    source = ListedCheckpoints(loras.configured_source(config, models).list_checkpoints())
    thumbnails = thumbnail_urls(encoder.encoder_id)
    prompt = fields.get("prompt")
    if refine == "contenders":
        refined = route_refine.refine(engine, images, source, prompt, method, include_not_installed, refine_max_images)
        return service.refine_payload(refined, thumbnails, top_k=top_k)
    result = service.identify(engine, images, source, prompt, method, include_not_installed)
    return service.identify_payload(result, thumbnails, top_k=top_k)


def thumbnail_key(query) -> tuple[str, str, str, int]:
    """(sha256, encoder_id, prompt_set_hash, prompt index) of a thumbnail request, each checked by its pattern."""
    sha, enc, psh = query.get("sha256", ""), query.get("encoder_id", ""), query.get("prompt_set_hash", "")
    if not (
        _HEX64.fullmatch(sha)
        and _ID.fullmatch(enc)
        and ".." not in enc
        and (re.fullmatch(r"[0-9a-f]{1,64}", psh) or psh == OBSERVED)
    ):
        raise InvalidInput("bad spec key")
    index = query.get("prompt", "")
    if not index.isdigit() or len(index) > 6:
        raise InvalidInput("prompt must be a prompt index")
    return sha, enc, psh, int(index)


def thumbnail_png(sha256: str, encoder_id: str, prompt_set_hash: str, index: int) -> bytes:
    try:
        pixels = engines.store().thumbnail(SpecKey(sha256, encoder_id, prompt_set_hash), index)  # a slice of the file
    except SpecError:  # no such spec, no such prompt, or an unreadable file
        pixels = None
    if pixels is None:
        raise NotFound("no such spec image")
    return png_bytes(pixels)


async def read_upload(request) -> tuple[list[tuple[str, bytes]], dict]:
    """(files, fields) of a multipart body; bytes counted as they arrive, images counted before any decode."""
    if request.content_type != "multipart/form-data":
        raise InvalidInput("send multipart/form-data with the image(s) as file fields")
    if request.content_length is not None and request.content_length > limits.MAX_UPLOAD_BYTES:
        raise limits.UploadTooLarge(f"upload larger than {limits.MAX_UPLOAD_BYTES // (1024 * 1024)} MiB")
    counter, parts = limits.ByteCounter(), limits.FieldCounter()
    files, fields = [], {}
    try:
        reader = await request.multipart()
        async for part in reader:
            if part is None:
                break
            parts.add()  # bounded before the part is read: 20,000 empty fields never stall the server
            chunks = []
            while True:
                chunk = await part.read_chunk(64 * 1024)
                if not chunk:
                    break
                chunks.append(counter.add(chunk))
            data = b"".join(chunks)
            if part.filename is not None:
                files.append((part.filename, data))
                limits.check_image_count(len(files))  # refused before any image is decoded
            elif part.name in _FIELDS:
                text = data.decode("utf-8", errors="replace")
                if len(text) > limits.MAX_TEXT_FIELD:
                    raise InvalidInput(f"field {part.name} is longer than {limits.MAX_TEXT_FIELD} characters")
                fields[part.name] = text
    except (ValueError, AssertionError, RuntimeError, UnicodeError) as exc:
        raise InvalidInput(f"malformed multipart body ({one_line(exc)})") from None
    if not files:
        raise InvalidInput("send at least one image as a multipart file field")
    return files, fields


def register(server) -> None:
    from aiohttp import web

    routes = server.routes

    async def run(func, *args):
        return await asyncio.get_running_loop().run_in_executor(None, func, *args)

    def error(exc: Exception):
        status = service.http_status(exc)
        if status >= 500 and not isinstance(exc, (OSError, EncoderUnavailable)):
            log.exception("gmi: unexpected error in a route")
            message = f"internal error ({type(exc).__name__}); see the ComfyUI log"
        else:
            message = one_line(exc)
        return web.json_response({"error": redact(message)}, status=status)

    def guarded(handler):
        async def wrapped(request):
            try:
                return await handler(request)
            except Exception as exc:  # noqa: BLE001 - every fault becomes a one-line JSON error, never a traceback page
                return error(exc)

        wrapped.__name__ = handler.__name__
        return wrapped

    @routes.get("/gmi/options")
    @guarded
    async def options(request):
        config = settings.load()
        return web.json_response(
            {
                "encoders": engines.encoder_choices(),
                "prompt_sets": engines.prompt_set_choices(),
                "methods": list(METHODS),
                "config": config,
                "build_inputs": build_inputs(config),
            }
        )

    @routes.get("/gmi/defaults")
    @guarded
    async def defaults(request):
        return web.json_response(service.defaults_payload())

    @routes.get("/gmi/status")
    @guarded
    async def status(request):
        config = status_config(request.query)
        return web.json_response(await run(status_payload, config))

    @routes.post("/gmi/identify")
    @guarded
    async def identify(request):
        files, fields = await read_upload(request)
        return web.json_response(await run(identify_payload, files, fields))

    @routes.get("/gmi/thumbnail")
    @guarded
    async def thumbnail(request):
        png = await run(thumbnail_png, *thumbnail_key(request.query))
        return web.Response(body=png, content_type="image/png", headers={"Cache-Control": "max-age=60"})

    from . import library_routes

    library_routes.register(routes, run, guarded)


def register_if_running() -> bool:
    try:
        from server import PromptServer
    except ImportError:
        return False
    server = getattr(PromptServer, "instance", None)
    if server is None:
        return False
    try:
        register(server)
    except Exception as exc:  # noqa: BLE001 - the nodes still work without the routes
        log.warning("gmi: routes not registered: %s", exc)
        return False
    return True
