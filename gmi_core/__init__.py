"""gmi: Generative Model Identification — find the local checkpoint that best matches an image.

Host-free engine: nothing here imports ComfyUI or the A1111 WebUI.
"""

__version__ = "0.1.0"
