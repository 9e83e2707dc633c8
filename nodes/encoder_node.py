"""GMI Load CLIP Encoder: the open_clip model (both towers) whose space specs and queries live in."""

from __future__ import annotations

from ..gmi_core.encoder_registry import DEFAULT_ENCODER
from . import engines

ENCODER_TYPE = "GMI_ENCODER"


class GMILoadEncoder:
    CATEGORY = "gmi"
    FUNCTION = "load"
    RETURN_TYPES = (ENCODER_TYPE,)
    RETURN_NAMES = ("encoder",)
    DESCRIPTION = (
        "Loads the CLIP model gmi compares images and prompts with (both towers). Known encoders are looked up in "
        "models/gmi (any CLIP .safetensors there), models/clip_vision, models/text_encoders and the Hugging Face "
        "cache, and downloaded into models/gmi on first use unless downloads are off. gmi encoder files in "
        "models/gmi are listed after them."
    )
    OUTPUT_TOOLTIPS = (
        "The CLIP encoder (image and text towers) for GMI Build Specs, GMI Identify and GMI Interrogate.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        choices = engines.encoder_choices()
        return {
            "required": {
                "encoder": (
                    choices,
                    {
                        "default": DEFAULT_ENCODER,
                        "tooltip": (
                            "A known CLIP encoder (found locally or downloaded on first use) or a gmi encoder file in "
                            "models/gmi. Specs are kept per encoder: identify with the encoder you built with."
                        ),
                    },
                ),
                "allow_download": (
                    "BOOLEAN",
                    {
                        "default": True,
                        "tooltip": (
                            "Download missing weights into models/gmi (through huggingface_hub: HF_ENDPOINT and HF_HUB_OFFLINE "
                            "apply; GMI_ALLOW_DOWNLOAD=0 forbids it for the whole server). Off: only local files."
                        ),
                    },
                ),
            }
        }

    def load(self, encoder: str, allow_download: bool = True):
        return (engines.get_encoder(encoder, allow_download),)
