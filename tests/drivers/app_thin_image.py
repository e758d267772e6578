"""The demo page's own functions on one thin image in a fresh process, with its peak memory (test_app).

Usage: python app_thin_image.py IMAGE; prints a JSON line: the image size after `open_image`, whether its token grid
is the usual one, and the peak memory (MB) of the request above the level after a first image."""

import json, resource, sys, torch  # noqa: E401
from groupvq_hf import GroupVQConfig, GroupVQModel
from groupvq_hf.app.page import DemoTokenizer, open_image
from groupvq_hf.data import demo_images

image_path = sys.argv[1]
torch.manual_seed(0)
tokenizer = DemoTokenizer(GroupVQModel(GroupVQConfig.from_preset("tiny")).eval())
first = tokenizer.tokenize(demo_images()[0])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
image = open_image(image_path)
result = tokenizer.tokenize(image)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({"size": image.size, "same_tokens": result.indices.shape == first.indices.shape,
                  "peak_mb": peak / 1024}))
