"""gmi as a ComfyUI node pack (custom_nodes/<this folder>): V3 nodes through ``comfy_entrypoint``, the side panel
from web/. ComfyUI imports this folder as a package; the engine (gmi_core) and the A1111 glue never import it.

The nodes are imported when ComfyUI calls the entrypoint, so importing the folder itself needs no ComfyUI (pytest
imports it as the tests' parent package).
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import comfy_entrypoint as nodes_entrypoint

    return await nodes_entrypoint()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
