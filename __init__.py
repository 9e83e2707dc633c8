"""gmi as a ComfyUI node pack (custom_nodes/<this folder>): V3 nodes through ``comfy_entrypoint``, the side panel
from web/. ComfyUI imports this folder as a package; the engine (gmi_core) and the A1111 glue never import it.
"""

WEB_DIRECTORY = "./web"

if __package__:
    from .nodes import comfy_entrypoint

    __all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
