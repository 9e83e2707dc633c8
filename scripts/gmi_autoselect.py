"""gmi: AlwaysVisible txt2img script "Auto-select checkpoint from reference image"."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
try:
    from gmi_a1111 import autoselect  # noqa: E402
finally:
    sys.path.remove(os.path.dirname(os.path.abspath(__file__)))

import gradio as gr  # noqa: E402
from modules import scripts  # noqa: E402


class GmiAutoSelect(scripts.Script):
    """Before processing, identifies the best checkpoint for the reference image and renders with it."""

    def title(self):
        return "GMI auto-select checkpoint"

    def show(self, is_img2img):
        return False if is_img2img else scripts.AlwaysVisible

    def ui(self, is_img2img):
        with gr.Accordion("Auto-select checkpoint from reference image", open=False, elem_id="gmi_autoselect"):
            enabled = gr.Checkbox(False, label="Enable", elem_id="gmi_autoselect_enabled")
            image = gr.Image(label="Reference image", type="pil", elem_id="gmi_autoselect_image")
            prompt = gr.Textbox(label="Prompt for the weights (empty: interrogate the reference)", elem_id="gmi_autoselect_prompt")
        self.infotext_fields = [(enabled, lambda d: autoselect.INFOTEXT_KEY in d)]
        return [enabled, image, prompt]

    def before_process(self, p, enabled=False, image=None, prompt="", *args):
        autoselect.apply(p, enabled, image, prompt)
