"""A1111 / Forge extension installer: runs on every WebUI launch, so it only checks unless something is missing.

It never installs, upgrades or downgrades torch or torchvision: the WebUI owns them. open_clip is installed
without its dependencies for that reason (the WebUI already ships open-clip-torch; gmi_core works with its 2.20).
"""

import launch  # the WebUI's launch module: is_installed, run_pip

# (import name, pip requirement, install without dependencies)
REQUIREMENTS = [
    ("open_clip", "open-clip-torch", True),
    ("ftfy", "ftfy", False),
    ("regex", "regex", False),
    ("safetensors", "safetensors", False),
]

for module, requirement, no_deps in REQUIREMENTS:
    if not launch.is_installed(module):
        flags = "--no-deps " if no_deps else ""
        launch.run_pip(f"install {flags}{requirement}", f"gmi requirement: {requirement}")
