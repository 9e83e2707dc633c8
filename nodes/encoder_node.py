"""GMI Load CLIP Encoder: the open_clip model (both towers) whose space specs and queries live in."""

from __future__ import annotations

from . import engines

ENCODER_TYPE = "GMI_ENCODER"


class GMILoadEncoder:
    CATEGORY = "gmi"
    FUNCTION = "load"
    RETURN_TYPES = (ENCODER_TYPE,)
    RETURN_NAMES = ("encoder",)
    DESCRIPTION = (
        "Loads the CLIP model gmi compares images and prompts with. Files in models/gmi are listed first; "
        "open_clip models are looked up in models/gmi, models/clip_vision and open_clip's cache."
    )
    OUTPUT_TOOLTIPS = ("The CLIP encoder (image and text towers) for GMI Build Specs, GMI Identify and GMI Interrogate.",)

    @classmethod
    def INPUT_TYPES(cls):
        choices = engines.encoder_choices()
        return {
            "required": {
                "encoder": (choices, {"default": choices[0] if choices else "ViT-L-14/openai", "tooltip": (
                    "A file in models/gmi, or an open_clip model/pretrained pair. Specs are kept per encoder: "
                    "identify with the encoder you built with.")}),
                "allow_download": ("BOOLEAN", {"default": False,
                                               "tooltip": "Fetch missing open_clip weights from Hugging Face (off: only local files)."}),
            }
        }

    def load(self, encoder: str, allow_download: bool = False):
        return (engines.get_encoder(encoder, allow_download),)
