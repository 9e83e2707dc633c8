"""Settings > GMI (registered by scripts/gmi_settings.py through on_ui_settings)."""

from __future__ import annotations

from modules import shared

from gmi_core.families import LIMITS, SIZE_MULTIPLE
from gmi_core.ranker import METHODS

from . import forge, runtime

SECTION = ("gmi", "GMI (checkpoint identification)")
PER_FAMILY_PREFIXES = tuple(f"gmi_{family.replace('-', '')}_" for family in forge.HOST_FAMILIES)


def _component_args(key: str):
    try:
        import gradio as gr
    except ImportError:  # headless tests: the WebUI always has gradio
        return None, None
    if not hasattr(gr, "Slider"):  # a bare folder named gradio on sys.path, not the package: headless too
        return None, None

    if key == "gmi_method":
        return gr.Dropdown, {"choices": list(METHODS)}
    name = key.rsplit("_", 1)[-1]
    if key.startswith(PER_FAMILY_PREFIXES) and name in LIMITS:
        lo, hi = LIMITS[name]
        step = SIZE_MULTIPLE if name in ("width", "height") else (0.5 if name == "cfg" else 1)
        return gr.Slider, {"minimum": lo, "maximum": hi, "step": step}
    if key == "gmi_top_k":
        return gr.Slider, {"minimum": 1, "maximum": 50, "step": 1}
    return None, None


def on_ui_settings() -> None:
    for key, (default, label, help_text) in runtime.OPTIONS.items():
        component, args = _component_args(key)
        onchange = runtime.reset if key in runtime.RESETTING_OPTIONS else None
        info = shared.OptionInfo(default, label, component, args, onchange=onchange, section=SECTION)
        shared.opts.add_option(key, info.info(help_text) if help_text else info)
