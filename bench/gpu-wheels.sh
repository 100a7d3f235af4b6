#!/usr/bin/env bash
# The wheels bench/gpu-checks.sh carries to a GPU machine (no network there; its image has torch, numpy, scipy,
# matplotlib, pytest and most of what cdae needs, Python 3.12): cdae built from this tree for CPython 3.12, and the
# dependencies that image lacks, at the versions constraints.txt pins. Writes .whl/ (git-ignored, ~22 MB).
#
#   bash bench/gpu-wheels.sh            # then: device run with carry [".whl"], command "bash bench/gpu-checks.sh"
set -eu
cd "$(dirname "$0")/.."
PY312=${PY312:-python3.12}
pin() { grep -i -E "^$1==" constraints.txt | head -1; }
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "$(pin pydantic)" "$(pin pydantic_core)" "$(pin annotated-types)" "$(pin typing-inspection)" \
    "$(pin typing_extensions)" "$(pin caproto)" "$(pin pyepics)" "$(pin pyzmq)"
# cdae with its C extensions, for the machine's CPython (pyenv: PYENV_VERSION picks a 3.12 where several exist)
PYENV_VERSION=${PYENV_VERSION:-$(pyenv versions --bare 2>/dev/null | grep '^3\.12' | tail -1)} \
    $PY312 -m pip wheel -q --no-deps -w .whl .
rm -rf build
ls -la .whl
