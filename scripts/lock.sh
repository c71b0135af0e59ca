#!/usr/bin/env bash
# Refresh requirements/lock.txt: every package (direct and transitive, with hashes) that
# scripts/setup.sh installs for routelens with its `test` and `ray` extras, resolved from
# the ranges in pyproject.toml for CPython 3.11 on Linux x86_64 (the machines CI runs on).
#
#   bash scripts/lock.sh            then run the tests (bash scripts/test.sh) and commit the lock
#
# torch is resolved as the CPU build 2.13.0 (its own dependencies are locked, torch itself
# is not: setup.sh installs it first, or keeps a GPU user's build). uv is pinned and runs
# from a throw-away environment, so refreshing needs nothing installed beforehand.
# tests/acceptance/test_lock.py checks that the lock and pyproject.toml agree and that .venv holds
# exactly the lock.
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=0.13.9
PYTHON_VERSION=${PYTHON_VERSION:-3.11.7}
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
python3 -m venv "$tools/venv"
"$tools/venv/bin/pip" install -q --disable-pip-version-check "uv==$UV_VERSION"
echo "torch==2.13.0+cpu" > "$tools/torch.txt"
# the build backend: setup.sh installs routelens itself without build isolation, from the lock
python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))' \
    > "$tools/build.txt"
if [ -d /opt/wheels ]; then
    wheels=/opt/wheels                                               # the CPU build on these machines
else                                                                 # only torch from PyTorch's index; the rest from PyPI
    wheels="$tools/wheels"
    "$tools/venv/bin/pip" download -q --no-deps -d "$wheels" --index-url https://download.pytorch.org/whl/cpu \
        --python-version 3.11 --platform manylinux_2_28_x86_64 --only-binary :all: "torch==2.13.0+cpu"
fi
mkdir -p requirements
"$tools/venv/bin/uv" pip compile pyproject.toml "$tools/build.txt" --extra test --extra ray --generate-hashes \
    --python-version "$PYTHON_VERSION" --python-platform x86_64-manylinux_2_28 \
    --find-links "$wheels" --constraint "$tools/torch.txt" --no-emit-package torch \
    --no-emit-find-links --no-emit-index-url \
    --custom-compile-command "bash scripts/lock.sh" --quiet -o requirements/lock.txt
sed -i "s|-r $tools/build.txt|the build-system of pyproject.toml|" requirements/lock.txt
echo "requirements/lock.txt: $(grep -c '==' requirements/lock.txt) packages locked"
