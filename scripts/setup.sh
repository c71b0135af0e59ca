#!/usr/bin/env bash
# Create .venv beside the repo and install routelens with its test and Ray extras. Idempotent.
#
# Everything but torch comes from requirements/lock.txt: exact versions with hashes,
# installed without resolving anything here (--no-deps), so a fresh machine gets the
# packages the suite last passed with (`bash scripts/lock.sh` refreshes the lock from the
# ranges in pyproject.toml). torch is pinned to 2.13.0 (a CPU build on these machines, so
# nothing pulls a multi-GB CUDA build); a torch already in .venv (a GPU user's own build,
# installed before running this) is kept. The lock is for CPython 3.11 on Linux x86_64;
# elsewhere the ranges of pyproject.toml are installed instead, and this script says so.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip=(.venv/bin/pip install -q --disable-pip-version-check)
[ -d /opt/wheels ] && pip+=(--find-links /opt/wheels)
if .venv/bin/python -c 'import platform, sys; sys.exit(not (sys.version_info[:2] == (3, 11) and sys.platform == "linux"
                                                             and platform.machine() == "x86_64"))'; then
    "${pip[@]}" --no-deps --require-hashes -r requirements/lock.txt
    if ! .venv/bin/python -c "import torch" 2>/dev/null; then
        if [ -d /opt/wheels ]; then      # the CPU build lies on these machines; its dependencies are locked
            "${pip[@]}" --no-deps "torch==${TORCH_VERSION:-2.13.0}"
        else                             # PyPI's Linux build is the CUDA one: take the CPU build from PyTorch's index
            "${pip[@]}" --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION:-2.13.0}+cpu"
        fi
    fi
    "${pip[@]}" --no-deps --no-build-isolation -e .
    .venv/bin/pip check --disable-pip-version-check >/dev/null || { .venv/bin/pip check; exit 1; }
else
    echo "setup: requirements/lock.txt is for CPython 3.11 on Linux x86_64, not $(.venv/bin/python -V) on $(uname -sm):" \
         "installing the ranges of pyproject.toml instead (versions may differ from CI's)" >&2
    .venv/bin/python -c "import torch" 2>/dev/null || "${pip[@]}" "torch==${TORCH_VERSION:-2.13.0}"
    "${pip[@]}" -e ".[test,ray]"
fi
# The llama extra (routelens.inference: llama.cpp, the real engine of the replay audit's tests).
# llama-cpp-python has no CPU wheel on PyPI: it is built from its source package (cmake and a C++
# compiler; minutes, once: pip caches the wheel), without the native-CPU tuning, OpenMP, tests,
# examples, tools and server, which it does not need here. ROUTELENS_NO_LLAMA=1 skips it (its tests
# are then skipped, saying why).
if [ -z "${ROUTELENS_NO_LLAMA:-}" ]; then
    llama=$(.venv/bin/python -c 'import tomllib; print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["llama"]))')
    # shellcheck disable=SC2086  # the pins are separate words
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_OPENMP=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAVA_BUILD=OFF -DLLAMA_CURL=OFF" \
        CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "${pip[@]}" $llama \
        || { echo "setup: could not build llama-cpp-python (needs cmake and a C++ compiler); ROUTELENS_NO_LLAMA=1 skips it" >&2; exit 1; }
fi
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
