"""Load a saved GroupVQVAE folder with diffusers.AutoModel where groupvq_hf cannot be imported (test_vq_model_saving).

Usage: python load_vae_remote_code.py FOLDER REF_PT; prints the model's module, class, whether it is a diffusers
VQModel and whether its output equals the reference saved in REF_PT."""

import sys

sys.modules["groupvq_hf"] = None
import torch, diffusers  # noqa: E401, E402

folder, ref_path = sys.argv[1:3]
model = diffusers.AutoModel.from_pretrained(folder, trust_remote_code=True)
ref = torch.load(ref_path)
with torch.no_grad():
    same = torch.equal(model(ref["x"]).sample, ref["sample"])
print(type(model).__module__, type(model).__name__, isinstance(model, diffusers.VQModel), same)
