#!/usr/bin/env bash
# The test command (what .ci/run runs): set up; the quick tier, lint and the docs site first
# (a broken docstring or lint fails in seconds); then the full tier (the gpu tier inside it
# is skipped without CUDA; the notebook and the README's examples included).
# Stops at the first failure, with its exit code.
#
# The full tier runs in pytest-xdist workers: a test that kills its worker (a crash in
# native code, a Ray failure) is reported as failed with the rest of the summary, instead
# of ending the run without one. Each test has a timeout (tests/conftest.py) scaled to the
# machine's load. Reports land in reports/ (JUnit XML); on failure the failed tests are
# listed again at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p reports
.venv/bin/python -m pytest -q -m quick --junitxml=reports/quick.xml
.venv/bin/ruff check .
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet --site-dir "$site"
status=0
# --timeout-method thread: a test stuck in native code (torch, Ray) is ended with its worker,
# which xdist reports and replaces
.venv/bin/python -m pytest -q -m "not quick" -n "${ROUTELENS_TEST_WORKERS:-2}" --dist loadfile \
    --timeout-method thread --junitxml=reports/full.xml || status=$?
if [ "$status" != 0 ]; then
    .venv/bin/python scripts/failed_tests.py reports/full.xml >&2 || true
fi
exit "$status"
