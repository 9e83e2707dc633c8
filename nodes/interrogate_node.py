"""GMI Interrogate: the pseudo-prompt gmi derives from an image (the text that drives the prompt weights)."""

from __future__ import annotations

from . import engines
from .encoder_node import ENCODER_TYPE
from .host import tensor_to_pils


class GMIInterrogate:
    CATEGORY = "gmi"
    FUNCTION = "interrogate"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("prompt",)
    DESCRIPTION = "Describes the image with CLIP labels; edit the result and feed it to GMI Identify's prompt."
    OUTPUT_TOOLTIPS = ("The pseudo-prompt: the labels closest to the image, joined into one prompt.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "encoder": (ENCODER_TYPE, {"tooltip": "The CLIP encoder (GMI Load CLIP Encoder)."}),
                "image": (
                    "IMAGE",
                    {"tooltip": "The image to describe; for a batch, their mean CLIP feature is described."},
                ),
            }
        }

    def interrogate(self, encoder, image):
        engine = engines.get_engine(encoder, engines.get_prompt_set("platform"))
        text = engine.interrogate(tensor_to_pils(image))
        return {"ui": {"text": [text]}, "result": (text,)}
