"""gmi: the "GMI" tab (Identify + Build specs)."""

from modules import script_callbacks

from gmi_a1111 import ui  # the WebUI puts the extension root on sys.path while it loads this file

script_callbacks.on_ui_tabs(ui.on_ui_tabs)
