#!/usr/bin/env python
"""Serve the interactive Group-VQ demo page (Gradio); see `groupvq_hf.app`.

    .venv/bin/python scripts/demo.py [--model PATH_OR_REPO] [--trust_remote_code] [--host 127.0.0.1] [--port 7860]

Without `--model` it serves the README demo's model (`outputs/demo/model`), or a page saying how to make it.
"""

from groupvq_hf.app import main

if __name__ == "__main__":
    main()
