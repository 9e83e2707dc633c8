"""gmi as a ComfyUI node pack (custom_nodes/<this folder>).

Also importable in plain Python: the node classes are defined and ComfyUI is imported only when a
node runs; the ComfyUI-only parts (the models/gmi folder, the /gmi/ routes) are set up only when
ComfyUI is running.
"""

WEB_DIRECTORY = "./web"

if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    from .nodes import setup as _setup

    _setup()
else:  # executed as a plain script, not as a package: nothing to register
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
