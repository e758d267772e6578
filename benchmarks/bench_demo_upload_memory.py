"""Peak memory of one demo-page request per kind of upload: ``open_image`` + ``DemoTokenizer.tokenize``.

Each upload runs in a fresh process (the tiny preset, 64 px crops): the PNG is written first, the page's tokenizer
answers one built-in photo (its steady state), then the upload; the number is ru_maxrss above that steady state.

    .venv/bin/python benchmarks/bench_demo_upload_memory.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

UPLOADS = {  # name: (mode, width, height)
    "thin RGB 8 x 4,900,000": ("RGB", 8, 4_900_000),
    "thin RGB 8 x 100,000": ("RGB", 8, 100_000),
    "square RGB 6,300 x 6,300 (39.7 MP, the cap is 40)": ("RGB", 6_300, 6_300),
}

CHILD = """
import json, resource, sys, torch
from PIL import Image
from groupvq_hf import GroupVQConfig, GroupVQModel
from groupvq_hf.app.page import DemoTokenizer, open_image
from groupvq_hf.data import demo_images
mode, width, height, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
Image.new(mode, (width, height), (128, 64, 32)).save(path)
torch.manual_seed(0)
tokenizer = DemoTokenizer(GroupVQModel(GroupVQConfig.from_preset("tiny")).eval())
tokenizer.tokenize(demo_images()[0])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tokenizer.tokenize(open_image(path))
print(json.dumps({"peak_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}))
"""


def main() -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    print("| upload | peak above steady state |\n|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for name, (mode, width, height) in UPLOADS.items():
            args = [sys.executable, "-c", CHILD, mode, str(width), str(height), os.path.join(folder, "upload.png")]
            out = subprocess.run(args, env=env, capture_output=True, text=True, check=True).stdout
            print(f"| {name} | {json.loads(out.splitlines()[-1])['peak_mb']:.0f} MB |")


if __name__ == "__main__":
    main()
