"""HTTP routes under /gmi/ (also served under /api/gmi/): status, options, identify upload, thumbnails.

Checkpoints are named only through ``folder_paths``; spec thumbnails come only from the spec store,
addressed by validated keys. No request path is ever joined onto the file system.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re

from ..gmi_core.errors import GmiError
from ..gmi_core.images import load_image
from ..gmi_core.protocols import GenerationSettings
from ..gmi_core.ranker import METHODS
from ..gmi_core.spec import SpecKey
from . import engines, settings
from .identify_node import ui_ranking

log = logging.getLogger("gmi")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_ID = re.compile(r"[A-Za-z0-9._/\-\[\]:]{1,200}")
MAX_UPLOAD = 32 * 1024 * 1024


def _int(value, default: int, lo: int = 0, hi: int = 10**6) -> int:
    try:
        return min(hi, max(lo, int(value)))
    except (TypeError, ValueError):
        return default


def status_payload(config: dict) -> dict:
    """Per-checkpoint spec state for the panel, for the given (or the last used) build settings."""
    encoder = engines.get_encoder(config["encoder"])
    prompts = engines.get_prompt_set(config["prompt_set"], config["max_prompts"])
    gen = GenerationSettings(
        steps=config["steps"], cfg=config["cfg"], sampler=config["sampler_name"], scheduler=config["scheduler"],
        width=config["width"], height=config["height"],
    )
    engine = engines.get_engine(encoder, prompts, config["images_per_prompt"], gen, config["seed"])
    statuses, skipped = engine.status(engines.source())
    return {
        "config": config,
        "encoder_id": encoder.encoder_id,
        "prompt_set": {"name": prompts.name, "hash": prompts.hash, "size": len(prompts)},
        "checkpoints": [s.__dict__ for s in statuses],
        "skipped": [{"name": s.name, "reason": s.reason} for s in skipped],
    }


def identify_payload(images, fields: dict) -> dict:
    encoder = engines.get_encoder(fields.get("encoder") or settings.load()["encoder"])
    prompts = engines.get_prompt_set(fields.get("prompt_set") or "platform", _int(fields.get("max_prompts"), 0))
    method = fields.get("method") or "gmi"
    if method not in METHODS:
        raise GmiError(f"unknown method {method!r}")
    engine = engines.get_engine(encoder, prompts)
    result = engine.identify(images, prompt=fields.get("prompt") or None, method=method, source=engines.source())
    top_k = _int(fields.get("top_k"), 0)
    data = ui_ranking(result, encoder.encoder_id, prompts.hash, result.best.name)
    if top_k:
        data["ranking"] = data["ranking"][:top_k]
    return data


def thumbnail_png(sha256: str, encoder_id: str, prompt_set_hash: str, index: int) -> bytes:
    pixels = engines.store().thumbnail(SpecKey(sha256, encoder_id, prompt_set_hash), index)  # a slice of the file
    if pixels is None:
        raise FileNotFoundError("no such spec image")
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, "PNG")
    return out.getvalue()


def register(server) -> None:
    from aiohttp import web

    routes = server.routes

    async def run(func, *args):
        return await asyncio.get_running_loop().run_in_executor(None, func, *args)

    def error(exc: Exception, status: int = 400):
        return web.json_response({"error": str(exc) or type(exc).__name__}, status=status)

    @routes.get("/gmi/options")
    async def options(request):
        return web.json_response({
            "encoders": engines.encoder_choices(),
            "prompt_sets": engines.prompt_set_choices(),
            "methods": list(METHODS),
            "config": settings.load(),
        })

    @routes.get("/gmi/status")
    async def status(request):
        config = settings.load()
        for key, default in settings.DEFAULTS.items():
            if key in request.query:
                value = request.query[key]
                config[key] = _int(value, default) if isinstance(default, int) else type(default)(value)
        try:
            return web.json_response(await run(status_payload, config))
        except GmiError as exc:
            return error(exc, 409)

    @routes.post("/gmi/identify")
    async def identify(request):
        if request.content_length and request.content_length > MAX_UPLOAD:
            return error(GmiError("upload too large"), 413)
        images, fields = [], {}
        try:
            reader = await request.multipart()
            async for part in reader:
                if part.filename:
                    data = await part.read(decode=False)
                    images.append(load_image(bytes(data), name=part.filename))
                elif part.name:
                    fields[part.name] = (await part.text())[:2000]
            if not images:
                raise GmiError("send at least one image as a multipart file field")
            return web.json_response(await run(identify_payload, images, fields))
        except GmiError as exc:
            return error(exc)

    @routes.get("/gmi/thumbnail")
    async def thumbnail(request):
        q = request.query
        sha, enc, psh = q.get("sha256", ""), q.get("encoder_id", ""), q.get("prompt_set_hash", "")
        if not (_HEX64.fullmatch(sha) and _ID.fullmatch(enc) and ".." not in enc and re.fullmatch(r"[0-9a-f]{1,64}", psh)):
            return error(GmiError("bad spec key"))
        try:
            png = await run(thumbnail_png, sha, enc, psh, _int(q.get("prompt"), -1, -1))
        except (FileNotFoundError, GmiError) as exc:
            return error(exc, 404)
        return web.Response(body=png, content_type="image/png", headers={"Cache-Control": "max-age=60"})


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
