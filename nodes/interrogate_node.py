"""GMI Interrogate: the pseudo-prompt gmi derives from an image (the text that drives the prompt weights)."""

from __future__ import annotations

from comfy_api.latest import io, ui

from ..gmi_core.prompts import DEFAULT_PROMPT_SET
from . import engines
from .encoder_node import Encoder
from .host import tensor_to_pils


class GMIInterrogate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GMIInterrogate",
            display_name="GMI Interrogate",
            category="gmi",
            description="Describes the image with CLIP labels; edit the result and feed it to GMI Identify's prompt.",
            inputs=[
                Encoder.Input("encoder", tooltip="The CLIP encoder (GMI Load CLIP Encoder)."),
                io.Image.Input(
                    "image", tooltip="The image to describe; for a batch, their mean CLIP feature is described."
                ),
            ],
            outputs=[
                io.String.Output(
                    display_name="prompt",
                    tooltip="The pseudo-prompt: the labels closest to the image, joined into one prompt.",
                ),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, encoder, image) -> io.NodeOutput:
        engine = engines.get_engine(encoder, engines.get_prompt_set(DEFAULT_PROMPT_SET))
        text = engine.interrogate(tensor_to_pils(image))
        return io.NodeOutput(text, ui=ui.PreviewText(text))
