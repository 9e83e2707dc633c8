"""gmi: Settings > GMI section."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
try:
    from gmi_a1111 import options  # noqa: E402
finally:
    sys.path.remove(os.path.dirname(os.path.abspath(__file__)))

from modules import script_callbacks  # noqa: E402

script_callbacks.on_ui_settings(options.on_ui_settings)
