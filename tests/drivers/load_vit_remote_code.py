"""Load a saved ViT GroupVQModel folder as remote code where groupvq_hf cannot be imported (test_vit).

Usage: python load_vit_remote_code.py FOLDER PIXELS_PT OUT_PT"""

import sys
sys.modules["groupvq_hf"] = None  # make the package unimportable: only the folder's code may be used
import torch
from transformers import AutoModel
folder, pixels_path, out_path = sys.argv[1:4]
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
assert "transformers_modules" in type(model).__module__, type(model).__module__
assert type(model.encoder).__name__ == "ViTEncoder", type(model.encoder)
with torch.no_grad():
    out = model(torch.load(pixels_path))
torch.save({"reconstruction": out.reconstruction, "indices": out.indices,
            "quantizer": type(model.quantizer).__name__}, out_path)
