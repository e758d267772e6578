"""Load a pipeline whose GroupVQVAE is a remote-code component where groupvq_hf cannot be imported, run it and save it
again (test_diffusers_pipelines).

Usage: python pipeline_remote_code.py ROOT; loads ROOT/remote, compares its images with ROOT/ref.npy, prints the
pipeline's class, the component's module and whether the images are equal, and saves it to ROOT/resaved."""

import sys
sys.modules["groupvq_hf"] = None
import numpy as np, torch  # noqa: E401, E402
from diffusers import DiffusionPipeline  # noqa: E402

root = sys.argv[1]
pipe = DiffusionPipeline.from_pretrained(root + "/remote", trust_remote_code=True)
out = pipe(num_inference_steps=2, generator=torch.manual_seed(0), output_type="np").images
print(type(pipe).__name__, type(pipe.vqvae).__module__, np.array_equal(out, np.load(root + "/ref.npy")))
pipe.save_pretrained(root + "/resaved")
