#!/usr/bin/env bash
# Make <forge>/venv for the opt-in real-Forge tests (docs/forge.md). Installs only from package registries (pip);
# Forge itself and its repositories/ must already be unpacked in <forge> (they are not on PyPI).
#   tests/forge_support/make_venv.sh /path/to/stable-diffusion-webui-forge
set -euo pipefail
FORGE=${1:?usage: make_venv.sh FORGE_DIR}
TORCH=(torch==2.14.1 torchvision==0.29.1)
PY=${PYTHON:-python3.11}
cd "$FORGE"
[ -x venv/bin/python ] || "$PY" -m venv venv
venv/bin/pip install -q "${TORCH[@]}"
# Forge's pins minus torch (unpinned there) and setuptools 69.5.1 (it makes pip downgrade torch >= 2.13; 80.9.0 still
# has pkg_resources, which Forge imports); torch stays pinned in the same call so pip cannot swap it.
REQS=$(mktemp)
trap 'rm -f "$REQS"' EXIT
grep -v -E '^(torch|setuptools)([=<> ]|$)' requirements_versions.txt > "$REQS"
venv/bin/pip install -q -r "$REQS" setuptools==80.9.0 joblib "${TORCH[@]}"
venv/bin/python -c "import torch, gradio; assert torch.__version__.startswith('2.14.1'), torch.__version__; print('torch', torch.__version__, 'gradio', gradio.__version__)"
