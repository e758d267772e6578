"""Load a SimVQ-backbone GroupVQModel (a folder or a Hub repo) as remote code where groupvq_hf cannot be
imported (test_simvq).

Usage: python load_simvq_remote_code.py SOURCE PIXELS_PT OUT_PT"""

import sys
sys.modules["groupvq_hf"] = None  # only the code saved beside the weights may be used
import torch
from transformers import AutoModel
source, pixels_path, out_path = sys.argv[1:4]
model = AutoModel.from_pretrained(source, trust_remote_code=True).eval()
assert "transformers_modules" in type(model).__module__, type(model).__module__
pixels = torch.load(pixels_path)
with torch.no_grad():
    out = model(pixels)
    decoded = model.decode_indices(out.indices)
torch.save({"reconstruction": out.reconstruction, "indices": out.indices, "decoded": decoded,
            "codebook": model.quantizer.codebook(), "config": model.config.to_dict()}, out_path)
