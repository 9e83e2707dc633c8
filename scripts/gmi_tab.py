"""gmi: the "GMI" tab (Identify + Build specs)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
try:
    from gmi_a1111 import ui  # noqa: E402
finally:
    sys.path.remove(os.path.dirname(os.path.abspath(__file__)))

from modules import script_callbacks  # noqa: E402

script_callbacks.on_ui_tabs(ui.on_ui_tabs)
