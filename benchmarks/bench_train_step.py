"""Training-step throughput: GroupVQModel against diffusers' VQModel with the same encoder and decoder.

Both models are built from one config and share the encoder, decoder and 1x1 convolution weights; only the
quantizer differs (Group-VQ vs diffusers' ``VectorQuantizer`` with as many codes). One step is forward,
``mse(reconstruction, x) + commitment loss``, backward and an Adam step. The quantizer's share is the
median over rounds of (quantizer forward+backward on the step's latents) / (whole Group-VQ step), timed
interleaved with the steps.

    .venv/bin/python benchmarks/bench_train_step.py                # tiny blocks, 16,384 codes, about 1 minute
    .venv/bin/python benchmarks/bench_train_step.py --preset imagenet --codebook-size 65536 \
        --resolution 128 --batch-size 2 --repeats 3 --threads 1 --clock cpu
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (
    add_timing_arguments,
    apply_timing_arguments,
    interleaved_times,
    markdown_table,
    median,
    paired_ratio,
    print_header,
    spread,
)


def build_models(config):
    """A GroupVQModel and a diffusers VQModel of the same architecture and codebook size, sharing weights."""
    from diffusers import VQModel

    from groupvq_hf import GroupVQModel

    torch.manual_seed(0)
    model = GroupVQModel(config)
    vae = VQModel(
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        down_block_types=tuple(config.down_block_types),
        up_block_types=tuple(config.up_block_types),
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        act_fn=config.act_fn,
        latent_channels=config.latent_channels,
        sample_size=config.sample_size,
        num_vq_embeddings=config.codebook_size,
        norm_num_groups=config.norm_num_groups,
        vq_embed_dim=config.codebook_dim,
        norm_type=config.norm_type,
        mid_block_add_attention=config.mid_block_add_attention,
    )
    shared = {k: v for k, v in model.state_dict().items() if not k.startswith("quantizer.")}
    missing, unexpected = vae.load_state_dict(shared, strict=False)
    if unexpected or any(not k.startswith("quantize.") for k in missing):
        raise RuntimeError(f"architectures differ: missing {missing}, unexpected {unexpected}")
    return model, vae


def make_step(model, pixels, diffusers_model: bool):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    model.train()

    def step():
        optimizer.zero_grad(set_to_none=True)
        if diffusers_model:
            out = model(pixels)
            loss = F.mse_loss(out.sample, pixels) + out.commit_loss
        else:
            out = model(pixels)
            loss = F.mse_loss(out.reconstruction, pixels) + out.commitment_loss
        loss.backward()
        optimizer.step()

    return step


def make_quantizer_step(quantizer, latent_shape):
    z = torch.randn(latent_shape, requires_grad=True)

    def step():
        quantizer.zero_grad(set_to_none=True)
        z.grad = None
        z_q, loss, _ = quantizer(z)
        (loss + z_q.mean()).backward()

    return step


def main(argv=None) -> None:
    from groupvq_hf import GroupVQConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", help="GroupVQConfig preset for the architecture.")
    parser.add_argument("--codebook-size", type=int, default=16384, help="Overrides the preset's (any preset).")
    parser.add_argument("--num-groups", type=int, default=64, help="Overrides the preset's (any preset).")
    parser.add_argument("--codebook-rank", type=int, default=None)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=15)
    add_timing_arguments(parser)
    args = parser.parse_args(argv)
    apply_timing_arguments(args)
    overrides = {"codebook_size": args.codebook_size, "num_groups": args.num_groups, "sample_size": args.resolution}
    if args.codebook_rank is not None:
        overrides["codebook_rank"] = args.codebook_rank
    config = GroupVQConfig.from_preset(args.preset, **overrides)
    model, vae = build_models(config)
    pixels = torch.rand(args.batch_size, config.in_channels, args.resolution, args.resolution) * 2 - 1
    side = args.resolution // config.downsample_factor
    latent_shape = (args.batch_size, config.codebook_dim, side, side)
    candidates = {
        "GroupVQModel": make_step(model, pixels, diffusers_model=False),
        "diffusers VQModel": make_step(vae, pixels, diffusers_model=True),
        "GroupVectorQuantizer fwd+bwd": make_quantizer_step(model.quantizer, latent_shape),
        "diffusers VectorQuantizer fwd+bwd": make_quantizer_step(vae.quantize, latent_shape),
    }
    print_header("Training step: GroupVQModel vs diffusers VQModel (same encoder/decoder)", args.clock)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"preset {args.preset}: blocks {config.block_out_channels}, {args.batch_size} x {args.resolution}px, "
        f"latents {latent_shape[1:]}, {config.codebook_size} codes in {config.num_groups} groups of rank "
        f"{model.quantizer.group_ranks[0]}, {params / 1e6:.2f} M trained parameters, {args.repeats} rounds"
    )
    times = interleaved_times(candidates, args.repeats, warmup=2, clock=args.clock)
    rows = []
    for name, t in times.items():
        per_s = f"{args.batch_size / median(t):.2f}" if "Model" in name else ""
        vs = {
            "GroupVQModel": f"{paired_ratio(times, 'GroupVQModel', 'diffusers VQModel'):.3f} x VQModel step",
            "diffusers VQModel": "1.000",
            "GroupVectorQuantizer fwd+bwd": f"{paired_ratio(times, name, 'GroupVQModel'):.3f} of the GroupVQModel step",
            "diffusers VectorQuantizer fwd+bwd": f"{paired_ratio(times, name, 'diffusers VQModel'):.3f} of the VQModel step",
        }[name]
        rows.append([name, spread(t), per_s, vs])
    print(markdown_table(["candidate", "ms", "images/s", "ratio"], rows))


if __name__ == "__main__":
    main()
