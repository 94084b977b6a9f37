#!/usr/bin/env bash
# Runs the whole test suite on a fresh Linux machine: makes .venv, installs the CPU build of torch and the
# requirements, then runs pytest. Extra arguments go to pytest (e.g. ./test.sh -k engine).
set -euo pipefail
cd "$(dirname "$0")"

python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The CPU build first, so requirements.txt's "torch>=2.4" is already satisfied and no multi-GB CUDA build is pulled.
python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
python -m pip install -q -r requirements.txt -r requirements-dev.txt

python -m pytest "$@"
