"""One of two processes saving to the same folders at once (test_vq_model_saving).

Usage: python save_one_folder.py SEED PATH; saves a tiny GroupVQModel to PATH/model and its GroupVQVAE to PATH/vae,
three times each, with a codebook of 64 * (SEED + 1) codes."""

import sys, torch  # noqa: E401
from groupvq_hf import GroupVQConfig, GroupVQModel, GroupVQVAE

seed, path = int(sys.argv[1]), sys.argv[2]
torch.manual_seed(seed)
small = dict(block_out_channels=(8, 16), norm_num_groups=8, latent_channels=8, sample_size=16)
model = GroupVQModel(GroupVQConfig.from_preset("tiny", codebook_size=64 * (seed + 1), **small))
vae = GroupVQVAE.from_groupvq(model)
for _ in range(3):
    model.save_pretrained(path + "/model")
    vae.save_pretrained(path + "/vae")
