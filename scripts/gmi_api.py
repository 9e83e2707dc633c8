"""gmi: HTTP API under /gmi/v1/ (see gmi_a1111/api.py for the routes)."""

from modules import script_callbacks

from gmi_a1111 import api  # the WebUI puts the extension root on sys.path while it loads this file

script_callbacks.on_app_started(api.on_app_started)
