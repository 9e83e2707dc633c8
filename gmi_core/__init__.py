"""gmi: Generative Model Identification - find the local checkpoint that best matches an image.

Host-free engine: nothing here imports ComfyUI or the A1111 WebUI.
"""

from ._version import read_version

__version__ = read_version()
