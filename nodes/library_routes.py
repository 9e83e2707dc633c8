"""Routes for specs without generating: POST /gmi/import-images and GET /gmi/map (also under /api/gmi/).

They are added to ComfyUI's own route table like the other gmi routes (the same access control) and go
through the same guard: one-line JSON errors without server paths, numbers checked by gmi_core.limits,
work off the event loop, JSON without NaN. import-images names a folder only as (root, subfolder) with
root one of ComfyUI's output, input or models folders; the resolved folder must stay inside that root
(gmi_core.paths.folder_inside: no absolute paths, '..', encoded forms or symlinks out), and files that
link out of it are skipped.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..gmi_core import limits, service
from ..gmi_core.errors import InvalidInput
from ..gmi_core.paths import folder_inside
from . import engines, loras, settings

log = logging.getLogger("gmi")
ROOTS = ("output", "input", "models")
_FIELDS = {"root", "subfolder", "encoder", "prompt_set", "max_prompts"}


def root_folder(root: str) -> Path:
    import folder_paths

    folders = {
        "output": folder_paths.get_output_directory,
        "input": folder_paths.get_input_directory,
        "models": lambda: folder_paths.models_dir,
    }
    if root not in folders:
        raise InvalidInput(f"root must be one of {', '.join(ROOTS)}")
    return Path(folders[root]()).resolve()


def confined_folder(root: str, subfolder: str = "") -> Path:
    """``subfolder`` of a host root, refused when it leaves the root (absolute, ``..``, symlink out)."""
    return folder_inside(root_folder(root), subfolder, "subfolder")


def _text(fields: dict, name: str, default: str = "") -> str:
    value = fields.get(name)
    if value is None or value == "":
        return default
    if not isinstance(value, str) or len(value) > limits.MAX_TEXT_FIELD:
        raise InvalidInput(f"{name} must be a string of at most {limits.MAX_TEXT_FIELD} characters")
    return value


def _max_prompts(fields: dict, default: int) -> int:
    value = fields.get("max_prompts")
    if value is None or value == "":
        return default
    if str(value).strip() == "0":  # 0 = the whole prompt set
        return 0
    return limits.positive_int("max_prompts", value, limits.MAX_PROMPT_SET_PROMPTS)


def _engine(fields: dict):
    config = settings.load()
    encoder = engines.get_encoder(_text(fields, "encoder", config["encoder"]))
    prompts = engines.get_prompt_set(
        _text(fields, "prompt_set", config["prompt_set"]), _max_prompts(fields, config["max_prompts"])
    )
    return engines.get_engine(encoder, prompts)


def import_images_payload(fields: dict) -> dict:
    """Runs in a worker thread: every field checked before the folder is read."""
    unknown = set(fields) - _FIELDS
    if unknown:
        raise InvalidInput(f"unknown field(s): {', '.join(sorted(str(k)[:40] for k in unknown))}")
    folder = confined_folder(_text(fields, "root", "output"), _text(fields, "subfolder"))
    return service.import_images_payload(_engine(fields), loras.saved_source(), folder)  # LoRA images too


def map_payload(fields: dict) -> dict:
    return service.map_payload(_engine(fields), engines.source())


async def read_json_body(request) -> dict:
    """A JSON object body, its bytes counted as they arrive (chunked too); InvalidInput for anything else."""
    if request.content_type != "application/json":
        raise InvalidInput("send application/json: an object {root, subfolder, encoder, ...}")
    if request.content_length is not None and request.content_length > limits.MAX_UPLOAD_BYTES:
        raise limits.UploadTooLarge(f"upload larger than {limits.MAX_UPLOAD_BYTES // (1024 * 1024)} MiB")
    counter = limits.ByteCounter(limits.MAX_UPLOAD_BYTES)
    chunks = [counter.add(chunk) async for chunk in request.content.iter_chunked(64 * 1024)]
    body = b"".join(chunks)
    limits.check_json_depth(body)  # bounded before the parser recurses
    try:
        fields = json.loads(body.decode("utf-8"))
    except (UnicodeError, ValueError):
        raise InvalidInput("the body is not valid JSON") from None
    if not isinstance(fields, dict):
        raise InvalidInput("send a JSON object {root, subfolder, encoder, ...}")
    return fields


def register(routes, run, guarded) -> None:
    from aiohttp import web

    @routes.post("/gmi/import-images")
    @guarded
    async def import_images_route(request):
        fields = await read_json_body(request)
        return web.json_response(await run(import_images_payload, fields))

    @routes.get("/gmi/map")
    @guarded
    async def library_map_route(request):
        return web.json_response(await run(map_payload, dict(request.query)))
