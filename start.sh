#!/usr/bin/env bash
# Starts my-chatglm2 on Linux or macOS: makes .venv on first use, installs the requirements, runs the server.
# Options go to the server, e.g. ./start.sh --profile low   or   ./start.sh chat
set -euo pipefail
cd "$(dirname "$0")"

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
    python -m pip install -q --upgrade pip
    if command -v nvidia-smi >/dev/null 2>&1 || [ "$(uname)" = "Darwin" ]; then
        python -m pip install torch            # CUDA build on Linux with an NVIDIA GPU; Metal/CPU on macOS
    else
        python -m pip install torch --index-url "${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
    fi
fi
python -m pip install -q -r requirements.txt
exec python -m server "$@"
