"""Load back every repo pushed by hub_push.py where groupvq_hf cannot be imported (test_hub).

Usage: python hub_load.py PIXELS_PT OUT_PT"""

import sys
sys.modules["groupvq_hf"] = None  # only the code published in the repos may be used
import numpy as np, torch
from PIL import Image
import diffusers
from transformers import AutoImageProcessor, AutoModel
pixels_path, out_path = sys.argv[1:3]
pixels = torch.load(pixels_path)
image = Image.fromarray((np.arange(40 * 48 * 3) % 251).astype(np.uint8).reshape(40, 48, 3))
out = {}
with torch.no_grad():
    for repo in ("tester/groupvq-tiny", "tester/native"):
        model = AutoModel.from_pretrained(repo, trust_remote_code=True).eval()
        processor = AutoImageProcessor.from_pretrained(repo, trust_remote_code=True)
        result, codebook_size = model(pixels), model.config.codebook_size
        sizes = model.resize_codebook(128, mode="resample", seed=1)
        out[repo] = {"module": type(model).__module__, "processor_module": type(processor).__module__,
                     "codebook_size": codebook_size, "reconstruction": result.reconstruction,
                     "indices": result.indices, "resampled_sizes": sizes,
                     "decoded": model.decode_indices(result.indices % 128),
                     "processed": processor(images=[image], return_tensors="pt").pixel_values}
    for repo in ("groupvq-org/groupvq-tiny-diffusers", "tester/native-diffusers"):
        vae = diffusers.AutoModel.from_pretrained(repo, trust_remote_code=True).eval()
        out[repo] = {"module": type(vae).__module__, "latents": vae.encode(pixels).latents,
                     "sample": vae(pixels).sample}
torch.save(out, out_path)
