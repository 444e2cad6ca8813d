#!/usr/bin/env bash
# Run HERE (any x86-64 or arm machine with pip and a package index), before a GPU session: downloads into
# .whl/ the wheels that the GPU machine lacks for our GPU tests (Python 3.12 there; torch, triton,
# transformers, safetensors, sentencepiece, httpx, anyio and pytest are already installed), at the versions
# of the local venv so both sides run the same code. The device tool carries .whl/ (ignored by git).
#
#   bash benchmarks/gpu/fetch_wheels.sh [PYTHON]      # PYTHON: the venv whose versions to pin (default .venv)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${1:-.venv/bin/python}
NAMES="pydantic pydantic-core annotated-types typing-inspection tenacity mistral-common pydantic-extra-types
       jsonschema jsonschema-specifications referencing rpds-py pytest-asyncio"
# shellcheck disable=SC2086
PINS=$("$PY" -m pip show $NAMES 2>/dev/null | awk '/^Name:/ {name=$2} /^Version:/ {print name "==" $2}')
[ "$(echo "$PINS" | wc -l)" -eq "$(echo $NAMES | wc -w)" ] || { echo "not all of $NAMES are in $PY's env" >&2; exit 1; }
rm -rf .whl && mkdir .whl
PLATFORMS=""
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS="$PLATFORMS --platform $p"
done
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLATFORMS -d .whl $PINS
ls .whl && du -sh .whl
