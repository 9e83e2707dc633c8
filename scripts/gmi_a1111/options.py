"""Settings > GMI (registered by scripts/gmi_settings.py through on_ui_settings)."""

from __future__ import annotations

from modules import shared

from gmi_core.ranker import METHODS

from . import runtime

SECTION = ("gmi", "GMI (checkpoint identification)")


def _component_args(key: str):
    try:
        import gradio as gr
    except ImportError:  # headless tests: the WebUI always has gradio
        return None, None

    if key == "gmi_method":
        return gr.Dropdown, {"choices": list(METHODS)}
    if key == "gmi_images_per_prompt":
        return gr.Slider, {"minimum": 1, "maximum": 16, "step": 1}
    if key == "gmi_steps":
        return gr.Slider, {"minimum": 1, "maximum": 150, "step": 1}
    if key in ("gmi_width", "gmi_height"):
        return gr.Slider, {"minimum": 64, "maximum": 2048, "step": 8}
    if key == "gmi_cfg":
        return gr.Slider, {"minimum": 0.0, "maximum": 30.0, "step": 0.5}
    if key == "gmi_top_k":
        return gr.Slider, {"minimum": 1, "maximum": 50, "step": 1}
    return None, None


def on_ui_settings() -> None:
    for key, (default, label) in runtime.OPTIONS.items():
        component, args = _component_args(key)
        info = shared.OptionInfo(default, label, component, args, section=SECTION)
        if key in ("gmi_encoder", "gmi_allow_download", "gmi_spec_dir", "gmi_prompt_set"):
            info.onchange = runtime.reset
        shared.opts.add_option(key, info)
