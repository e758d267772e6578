#!/usr/bin/env python
"""Convert Group-VQ checkpoints between transformers and diffusers, import a diffusers VQModel, or switch a saved
pipeline's GroupVQVAE components between library and remote-code form. Logic: `groupvq_hf.hub.conversion`.

    # transformers GroupVQModel <-> diffusers GroupVQVAE (lossless; direction read from config.json)
    python scripts/convert_checkpoint.py groupvq-tiny groupvq-tiny-diffusers
    python scripts/convert_checkpoint.py groupvq-tiny-diffusers groupvq-tiny-transformers
    # a pipeline's VQModel -> GroupVQVAE (encoder/decoder kept, new Group-VQ quantizer) for fine-tuning
    python scripts/convert_checkpoint.py amused-256 vqvae-groupvq --subfolder vqvae --num_groups 8 --seed 0
    # a saved pipeline whose GroupVQVAE loads with trust_remote_code=True and no groupvq_hf
    python scripts/convert_checkpoint.py my-pipeline my-pipeline-remote --pipeline_components remote_code
    # a SimVQ Lightning checkpoint (youngsheen/SimVQ) -> a k = 1 GroupVQModel with the "simvq" backbone
    # (EMA weights by default when the checkpoint has them; --no_ema for the raw ones). Logic: groupvq_hf.hub.simvq_conversion
    python scripts/convert_checkpoint.py --from_simvq simvq.ckpt --config imagenet_simvq_128_B.yaml simvq-groupvq
    # ... keeping SimVQ's discriminator (discriminator.safetensors) for `scripts/train.py --init_from simvq-groupvq`
    python scripts/convert_checkpoint.py --from_simvq simvq.ckpt --config imagenet_simvq_128_B.yaml simvq-groupvq \\
        --keep_discriminator
"""

import os
import sys

# scripts/ holds evaluate.py, named like the `evaluate` library: keep this folder off the import path.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

from groupvq_hf.hub import convert_main as main  # noqa: E402

if __name__ == "__main__":
    main()
