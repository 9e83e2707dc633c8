"""Routes for specs without generating: POST /gmi/import-images and GET /gmi/map (also under /api/gmi/).

import-images names a folder only as (root, subfolder) with root one of ComfyUI's output, input or
models folders; the resolved folder must stay inside that root (no absolute paths, no ``..`` escape).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..gmi_core.errors import GmiError
from ..gmi_core.library_map import build_map
from ..gmi_core.observed import folder_inside, import_images
from . import engines, settings

log = logging.getLogger("gmi")
ROOTS = ("output", "input", "models")


def root_folder(root: str) -> Path:
    import folder_paths

    folders = {"output": folder_paths.get_output_directory, "input": folder_paths.get_input_directory,
               "models": lambda: folder_paths.models_dir}
    if root not in folders:
        raise GmiError(f"root must be one of {', '.join(ROOTS)}")
    return Path(folders[root]()).resolve()


def confined_folder(root: str, subfolder: str = "") -> Path:
    """``subfolder`` of a host root, refused when it leaves the root (absolute, ``..``, symlink out)."""
    return folder_inside(root_folder(root), subfolder)


def _engine(fields: dict):
    config = settings.load()
    encoder = engines.get_encoder(str(fields.get("encoder") or config["encoder"]))
    prompts = engines.get_prompt_set(str(fields.get("prompt_set") or config["prompt_set"]),
                                     int(fields.get("max_prompts") or config["max_prompts"]))
    return engines.get_engine(encoder, prompts)


def import_images_payload(fields: dict) -> dict:
    folder = confined_folder(str(fields.get("root") or "output"), str(fields.get("subfolder") or ""))
    engine = _engine(fields)
    return import_images(engine, engines.source().list_checkpoints(), folder).to_dict()


def map_payload(fields: dict) -> dict:
    engine = _engine(fields)
    specs, excluded = engine.load_specs(engines.source(), include_not_installed=True)
    if not specs:
        return {"checkpoints": [], "groups": [], "excluded": [{"name": n, "reason": r} for n, r in excluded]}
    data = build_map(specs, engine.prompt_features, excluded=excluded).to_dict()
    data.pop("relative_distance")
    return data


def register(routes, run, error) -> None:
    from aiohttp import web

    @routes.post("/gmi/import-images")
    async def import_images_route(request):
        try:
            fields = await request.json()
            if not isinstance(fields, dict):
                raise GmiError("send a JSON object {root, subfolder, encoder}")
            return web.json_response(await run(import_images_payload, fields))
        except (GmiError, ValueError) as exc:
            return error(exc)

    @routes.get("/gmi/map")
    async def library_map_route(request):
        try:
            return web.json_response(await run(map_payload, dict(request.query)))
        except GmiError as exc:
            return error(exc, 409)
