#!/usr/bin/env bash
# The test command (what .ci/run runs): set up, then the quick tier (< 30 s), the full tier
# (the gpu tier inside it is skipped without CUDA), the notebook, lint and the docs site.
# Stops at the first failure, with its exit code.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -q -m quick
.venv/bin/python -m pytest -q -m "not quick"
.venv/bin/ruff check .
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet --site-dir "$(mktemp -d)"
