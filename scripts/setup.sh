#!/usr/bin/env bash
# Create .venv beside the repo and install routelens with its test and Ray extras. Idempotent.
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
.venv/bin/pip install -q --disable-pip-version-check "${find_links[@]}" -e ".[test,ray]"
# The report test opens a report in headless Chromium (Debian's chromium and chromium-driver).
# Set ROUTELENS_NO_BROWSER=1 to skip; without them that one test is skipped, saying why.
if [ -z "${ROUTELENS_NO_BROWSER:-}" ] && ! command -v chromedriver >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            chromium chromium-driver >/dev/null) || echo "setup: could not install chromium; the browser test will be skipped" >&2
    else
        echo "setup: chromium/chromedriver missing and not root; the browser test will be skipped" >&2
    fi
fi
.venv/bin/python -c "import torch, transformers, routelens; print(f'routelens {routelens.__version__}: torch {torch.__version__}, transformers {transformers.__version__}')"
