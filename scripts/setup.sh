#!/usr/bin/env bash
# Create .venv beside the repo and install routelens with its test extras. Idempotent.
#
# torch is installed first and pinned to 2.13.0 (a CPU build on these machines), so that
# nothing pulls a multi-GB CUDA build. If .venv already has a torch (a GPU user's own
# build, installed before running this), it is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
find_links=()
[ -d /opt/wheels ] && find_links=(--find-links /opt/wheels)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/pip install -q --disable-pip-version-check "${find_links[@]}" "torch==${TORCH_VERSION:-2.13.0}"
fi
.venv/bin/pip install -q --disable-pip-version-check "${find_links[@]}" -e ".[test]"
.venv/bin/python -c "import torch, transformers, routelens; print(f'routelens {routelens.__version__}: torch {torch.__version__}, transformers {transformers.__version__}')"
