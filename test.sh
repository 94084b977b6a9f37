#!/usr/bin/env bash
# Runs the whole test suite on a fresh Linux machine: makes .venv, installs the CPU build of torch and the
# requirements, then runs pytest. Extra arguments go to pytest (e.g. ./test.sh -k engine).
set -euo pipefail
cd "$(dirname "$0")"

# The browser tests drive Debian's Chromium; a CJK font makes their screenshots readable. Installed when we can
# (root with apt-get, as in CI); without Chromium those tests are skipped with the reason.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    missing=""
    command -v chromium >/dev/null 2>&1 || missing="chromium"
    [ -e /usr/share/fonts/truetype/wqy/wqy-zenhei.ttc ] || missing="$missing fonts-wqy-zenhei"
    if [ -n "$missing" ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
    fi
fi

python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The CPU build first, so requirements.txt's "torch>=2.4" is already satisfied and no multi-GB CUDA build is pulled.
python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
python -m pip install -q -r requirements.txt -r requirements-dev.txt

python -m pytest "$@"
