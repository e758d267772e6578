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
# The demo page's browser test drives Debian's Chromium through Playwright (Playwright's own browser download is
# not used). Installed here so that README's test command passes on a fresh Debian machine.
if ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "Chromium not found: install Debian's 'chromium' package (as root: apt-get install -y chromium)" \
      "for the demo page's browser test." >&2
    exit 1
  fi
fi
echo "groupvq-hf installed in $(pwd)/.venv"
