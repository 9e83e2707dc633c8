"""gmi: Settings > GMI section."""

from modules import script_callbacks

from gmi_a1111 import options  # the WebUI puts the extension root on sys.path while it loads this file

script_callbacks.on_ui_settings(options.on_ui_settings)
