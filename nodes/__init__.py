"""gmi's ComfyUI nodes. Modules import ComfyUI lazily, so this package imports in plain Python too."""

from .build_node import GMIBuildSpecs
from .encoder_node import GMILoadEncoder
from .identify_node import GMIIdentify
from .interrogate_node import GMIInterrogate

NODE_CLASS_MAPPINGS = {
    "GMILoadEncoder": GMILoadEncoder,
    "GMIBuildSpecs": GMIBuildSpecs,
    "GMIIdentify": GMIIdentify,
    "GMIInterrogate": GMIInterrogate,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "GMILoadEncoder": "GMI Load CLIP Encoder",
    "GMIBuildSpecs": "GMI Build Specs",
    "GMIIdentify": "GMI Identify",
    "GMIInterrogate": "GMI Interrogate",
}


def setup() -> bool:
    """Inside ComfyUI: the models/gmi folder and the /gmi/ routes. Returns whether ComfyUI was found."""
    from . import engines, host, routes

    try:
        host.register_model_folder()
    except ImportError:
        return False
    running = routes.register_if_running()
    if running:
        engines.warm_in_background()
    return running
