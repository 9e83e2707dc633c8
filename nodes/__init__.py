"""gmi's ComfyUI nodes on the V3 schema (``comfy_api.latest``), registered through :func:`comfy_entrypoint`."""

from comfy_api.latest import ComfyExtension, io

from .build_node import GMIBuildSpecs
from .encoder_node import GMILoadEncoder
from .identify_node import GMIIdentify
from .interrogate_node import GMIInterrogate


class GmiExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [GMILoadEncoder, GMIBuildSpecs, GMIIdentify, GMIInterrogate]


def setup() -> bool:
    """The models/gmi folder and the /gmi/ routes. Returns whether ComfyUI's server is running."""
    from . import engines, host, routes

    host.register_model_folder()
    running = routes.register_if_running()
    if running:
        engines.warm_in_background()
    return running


async def comfy_entrypoint() -> GmiExtension:
    """Called once by ComfyUI when it loads the pack (after its server exists)."""
    setup()
    return GmiExtension()
