"""gmi: AlwaysVisible txt2img script "Auto-select checkpoint from reference image"."""

import gradio as gr
from modules import scripts

from gmi_a1111 import autoselect  # the WebUI puts the extension root on sys.path while it loads this file


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
            prompt = gr.Textbox(
                label="Prompt for the weights (empty: interrogate the reference)", elem_id="gmi_autoselect_prompt"
            )
        self.infotext_fields = [(enabled, lambda d: autoselect.INFOTEXT_KEY in d)]
        return [enabled, image, prompt]

    def before_process(self, p, enabled=False, image=None, prompt="", *args):
        autoselect.apply(p, enabled, image, prompt)
