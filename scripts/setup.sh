#!/usr/bin/env bash
# Create .venv and install groupvq-hf with its test tools. torch is pinned to the release this project is
# tested with (CPU or CUDA wheels both work); everything else comes from pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[dev,demo]"
echo "groupvq-hf installed in $(pwd)/.venv"
