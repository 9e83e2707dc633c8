"""gmi: HTTP API under /gmi/v1/ (see gmi_a1111/api.py for the routes)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
try:
    from gmi_a1111 import api  # noqa: E402
finally:
    sys.path.remove(os.path.dirname(os.path.abspath(__file__)))

from modules import script_callbacks  # noqa: E402

script_callbacks.on_app_started(api.on_app_started)
