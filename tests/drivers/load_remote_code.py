"""Load a saved GroupVQModel folder as remote code where groupvq_hf cannot be imported (test_remote_code).

Usage: python load_remote_code.py FOLDER PIXELS_PT OUT_PT"""

import sys
sys.modules["groupvq_hf"] = None  # make the package unimportable: only the folder's code may be used
import torch
from transformers import AutoImageProcessor, AutoModel
folder, pixels_path, out_path = sys.argv[1:4]
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
assert "transformers_modules" in type(model).__module__, type(model).__module__
processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
assert "transformers_modules" in type(processor).__module__
pixels = torch.load(pixels_path)
with torch.no_grad():
    out = model(pixels)
    sizes = model.resize_codebook(2 * model.config.codebook_size, mode="extend", seed=0)
    decoded = model.decode_indices(torch.full((1, 4, 4), sum(sizes) - 1))
torch.save({"reconstruction": out.reconstruction, "indices": out.indices, "sizes": sizes,
            "decoded": decoded, "codebook": model.quantizer.codebook()}, out_path)
