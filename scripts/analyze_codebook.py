#!/usr/bin/env python
"""Figures and numbers of the paper's section 4.2 / appendix D for a Group-VQ model.

    python scripts/analyze_codebook.py --model PATH_OR_REPO --output_dir DIR \
        [--dataset demo --split train --max_samples 256] [--trained_codebook_size 1024]

Writes norm_statistics.png (Fig. 5 left), group_frequency.png (Fig. 5 right, with --dataset),
cosine_similarity.png (Fig. 6), random_projection.png (Fig. 7), pca_projection.png (Fig. 9) and
codebook_analysis.json. All logic lives in `groupvq_hf.evaluation`.
"""

from __future__ import annotations

import os
import sys

# scripts/ holds evaluate.py, named like the `evaluate` library: keep this folder off the import path.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse
import json

import torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="local folder or Hub repo id of a GroupVQModel")
    p.add_argument("--revision", default=None, help="Hub revision of --model")
    p.add_argument("--output_dir", required=True, help="where the PNGs and codebook_analysis.json go")
    p.add_argument("--dataset", default=None, help="dataset for the usage frequency (Fig. 5 right), as in groupvq_hf.data")
    p.add_argument("--split", default="validation")
    p.add_argument("--image_column", default=None)
    p.add_argument("--resolution", type=int, default=None, help="default: the model's config.sample_size")
    p.add_argument("--max_samples", type=int, default=None, help="images of --dataset to encode")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--dataloader_num_workers", type=int, default=0)
    trained = p.add_mutually_exclusive_group()
    trained.add_argument(
        "--trained_codebook_size", type=int, default=None,
        help="codebook size at training time, for a self-extended model: marks trained vs newly sampled codes",
    )
    trained.add_argument(
        "--trained_group_sizes", type=int, nargs="+", default=None,
        help="per-group trained code counts (instead of --trained_codebook_size)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the code samples and the random projection")
    p.add_argument("--heatmap_codes_per_group", type=int, default=None, help="default: 128, at most 2048 in all")
    p.add_argument("--scatter_codes_per_group", type=int, default=64)
    p.add_argument("--highlight_codes_per_group", type=int, default=256)
    p.add_argument("--dpi", type=int, default=120)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def main(argv=None) -> dict[str, str]:
    args = parse_args(argv)
    from groupvq_hf import GroupVQModel
    from groupvq_hf.evaluation import analyze_codebook, dataset_code_usage, save_analysis

    model = GroupVQModel.from_pretrained(args.model, revision=args.revision).to(args.device).eval()
    counts = None
    if args.dataset is not None:
        counts, num_images = dataset_code_usage(
            model, args.dataset, split=args.split, resolution=args.resolution, image_column=args.image_column,
            max_samples=args.max_samples, batch_size=args.batch_size, num_workers=args.dataloader_num_workers,
            seed=args.seed,
        )
        print(f"encoded {num_images} images of {args.dataset}/{args.split}", file=sys.stderr)
    analysis = analyze_codebook(
        model,
        usage_counts=counts,
        trained_group_sizes=args.trained_group_sizes or args.trained_codebook_size,
        seed=args.seed,
        heatmap_codes_per_group=args.heatmap_codes_per_group,
        scatter_codes_per_group=args.scatter_codes_per_group,
        highlight_codes_per_group=args.highlight_codes_per_group,
    )
    if counts is not None:
        analysis.stats["usage"].update(dataset=args.dataset, split=args.split, num_images=num_images)
    analysis.stats["model"] = args.model
    paths = save_analysis(analysis, args.output_dir, dpi=args.dpi)
    print(json.dumps(paths, indent=1))
    return paths


if __name__ == "__main__":
    main()
