#!/usr/bin/env bash
# The opt-in fuzz tier (issue 32): every served family on ROUTELENS_FUZZ_EXAMPLES (default 20)
# generated configs each, plus the fixed regression draws. About 10 minutes on 2 cores.
# The full tier (scripts/test.sh) runs three draws per family.
set -euo pipefail
cd "$(dirname "$0")/.."
export ROUTELENS_FUZZ_EXAMPLES=${ROUTELENS_FUZZ_EXAMPLES:-20}
.venv/bin/python -m pytest -q tests/models/test_config_fuzz.py -n "${ROUTELENS_TEST_WORKERS:-2}" "$@"
