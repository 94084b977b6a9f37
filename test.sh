#!/usr/bin/env bash
# Runs the whole test suite on a fresh Linux machine: makes .venv, installs the CPU build of torch and the
# requirements, then runs pytest. Extra arguments go to pytest (e.g. ./test.sh -k engine).
set -euo pipefail
cd "$(dirname "$0")"

# The browser tests drive Debian's Chromium (a CJK font makes their screenshots readable), the bundle tests run
# the launchers (and the whole bundle, model stack included) under Debian's wine. Installed when we can (root with apt-get, as in CI); without them those
# tests are skipped with the reason.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    missing=""
    command -v chromium >/dev/null 2>&1 || missing="chromium"
    command -v wine >/dev/null 2>&1 || missing="$missing wine"  # runs the Windows launchers in tests
    # builds the test-only bcryptprimitives.dll stub that wine 8.0 needs for the full bundle's Rust-built wheels
    command -v x86_64-w64-mingw32-gcc >/dev/null 2>&1 || missing="$missing gcc-mingw-w64-x86-64"
    [ -e /usr/share/fonts/truetype/wqy/wqy-zenhei.ttc ] || missing="$missing fonts-wqy-zenhei"
    python3 -c "import ensurepip" 2>/dev/null || missing="$missing python3-venv"  # Debian's python3 splits it out
    if [ -n "$missing" ]; then
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null; } \
            || echo "could not install$missing: the tests that need them will be skipped"
    fi
fi

# A venv is made once, and again (--clear) only when it no longer runs: re-running venv over one that another
# Python made (pyenv's, then Debian's) leaves a mix that cannot import its standard library.
usable() { "$1/bin/python" -c "import unicodedata, ensurepip" >/dev/null 2>&1; }
usable .venv || python3 -m venv --clear .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The CPU build first, so requirements.txt's "torch>=2.4" is already satisfied and no multi-GB CUDA build is pulled.
python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
python -m pip install -q -r requirements.txt -r requirements-dev.txt

ruff check .  # the lint rules in pyproject.toml
python -m pytest "$@"

# The Windows bundle (Python 3.10) pins an older transformers: run the model tests again with that version.
bundle_transformers=$(grep -oE '^transformers==[0-9.]+' packaging/win-py310.lock)
usable .venv-bundle || python3 -m venv --clear .venv-bundle
.venv-bundle/bin/python -m pip install -q --upgrade pip
.venv-bundle/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
.venv-bundle/bin/python -m pip install -q -r requirements.txt -r requirements-dev.txt "$bundle_transformers"
echo "model tests again with $bundle_transformers (the bundle's)"
.venv-bundle/bin/python -m pytest -q tests/test_convert.py tests/test_engine.py tests/test_batching.py tests/test_layered_prefill.py tests/test_prefix_cache.py tests/test_export.py tests/test_tokenizer.py tests/test_cpu_quant.py tests/test_int4_vnni.py \
    tests/test_http.py tests/test_openai_api.py "$@"
