#!/usr/bin/env python
"""Serve the interactive Group-VQ demo page (Gradio); see `groupvq_hf.app.page`.

    .venv/bin/python scripts/demo.py [--model PATH_OR_REPO] [--trust_remote_code] [--host 127.0.0.1] [--port 7860]
    .venv/bin/python scripts/demo.py --model PATH_OR_REPO --screenshot docs/demo.png   # save the page as PNG, exit

Without `--model` it serves the README demo's model (`outputs/demo/model`), or a page saying how to make it.
"""

import os
import sys

# scripts/evaluate.py is named like the `evaluate` library: keep this folder off the import path.
_HERE = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != _HERE]

from groupvq_hf.app import main  # noqa: E402

if __name__ == "__main__":
    main()
