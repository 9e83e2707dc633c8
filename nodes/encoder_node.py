"""GMI Load CLIP Encoder: the open_clip model (both towers) whose space specs and queries live in."""

from __future__ import annotations

from comfy_api.latest import io

from ..gmi_core.encoder_registry import DEFAULT_ENCODER
from . import engines

Encoder = io.Custom("GMI_ENCODER")  # a gmi ClipEncoder, passed from this node to the other three


class GMILoadEncoder(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GMILoadEncoder",
            display_name="GMI Load CLIP Encoder",
            category="gmi",
            description=(
                "Loads the CLIP model gmi compares images and prompts with (both towers). Known encoders are looked up "
                "in models/gmi (any CLIP .safetensors there), models/clip_vision, models/text_encoders and the Hugging "
                "Face cache, and downloaded into models/gmi on first use unless downloads are off. gmi encoder files in "
                "models/gmi are listed after them."
            ),
            inputs=[
                io.Combo.Input(
                    "encoder",
                    options=engines.encoder_choices(),
                    default=DEFAULT_ENCODER,
                    tooltip=(
                        "A known CLIP encoder (found locally or downloaded on first use) or a gmi encoder file in "
                        "models/gmi. Specs are kept per encoder: identify with the encoder you built with."
                    ),
                ),
                io.Boolean.Input(
                    "allow_download",
                    default=True,
                    tooltip=(
                        "Download missing weights into models/gmi (through huggingface_hub: HF_ENDPOINT and HF_HUB_OFFLINE "
                        "apply; GMI_ALLOW_DOWNLOAD=0 forbids it for the whole server). Off: only local files."
                    ),
                ),
            ],
            outputs=[
                Encoder.Output(
                    display_name="encoder",
                    tooltip="The CLIP encoder (image and text towers) for GMI Build Specs, GMI Identify and GMI Interrogate.",
                ),
            ],
        )

    @classmethod
    def execute(cls, encoder: str, allow_download: bool = True) -> io.NodeOutput:
        return io.NodeOutput(engines.get_encoder(encoder, allow_download))
