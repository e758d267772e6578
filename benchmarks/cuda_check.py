"""One prepared CUDA check: quantizer correctness, the tokenizer loop (no sync, tokens), search precision under
TF32/bf16, quantizer speed and memory against the bare limit and diffusers' VectorQuantizer, and bf16 training steps
of GroupVQModel vs diffusers VQModel.

    PYTHONPATH=src python benchmarks/cuda_check.py            # on a machine with a CUDA GPU

Prints Markdown tables (copied into benchmarks/RESULTS.md). Times are CUDA-event medians after warm-up.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import markdown_table  # noqa: E402

from groupvq_hf import GroupVQConfig, GroupVQModel, GroupVectorQuantizer  # noqa: E402
from groupvq_hf.quantizer import nearest_code_indices  # noqa: E402

DEV = torch.device("cuda")


def cuda_ms(fn, repeats=10, warmup=3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bare_limit(z, codebook, block=2048):
    """The bare chunked (|c|^2 - 2 z.c).argmin over the whole codebook, 2,048 tokens at a time."""
    code_sq = codebook.pow(2).sum(1)
    return torch.cat([torch.addmm(code_sq, blk, codebook.t(), alpha=-2).argmin(1) for blk in z.split(block)])


def correctness():
    print("\n## Correctness on CUDA\n")
    torch.manual_seed(0)
    q = GroupVectorQuantizer(4096, 64, num_groups=16, codebook_rank=32).to(DEV)
    z = torch.randn(2, 64, 32, 32, device=DEV)
    z_q, loss, (_, _, idx) = q(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 64).double()
    ref = torch.cdist(flat, q.codebook().double()).argmin(1).view_as(idx)
    rows = [["indices == float64 cdist argmin", bool(torch.equal(idx, ref))]]
    rows.append(["z_q vs codebook[indices], max abs diff (straight-through rounding)",
                 f"{(z_q - q.codebook()[idx].permute(0, 3, 1, 2)).abs().max().item():.1e}"])
    loss.backward()
    rows.append(["grads reach weight/bias, not core", bool(q.weight.grad.abs().sum() > 0 and q.core.grad is None)])
    old_core, old_codes = q.core.clone(), q.codebook().detach().clone()
    q.resize_codebook(8192, mode="extend", seed=0)
    rows.append(["extend: cores bit-for-bit, on cuda", bool(torch.equal(q.core[:, :256], old_core) and q.core.is_cuda)])
    rows.append(
        ["extend: old codes max abs diff", f"{(q.codebook().detach().view(16, 512, 64)[:, :256] - old_codes.view(16, 256, 64)).abs().max().item():.1e}"]
    )
    q.resize_codebook(2048, mode="resample", seed=0)
    rows.append(["resample: size, device", f"{q.codebook_size}, {q.core.device}"])
    with q.counting_usage():
        q(z)
    rows.append(["usage counts device", str(q.usage_counts().device)])
    print(markdown_table(["check", "result"], rows))


def precision():
    print("\n## Search precision vs an exact float64 search (8,192 tokens x 65,536 codes, d=128, 64 groups)\n")
    torch.manual_seed(0)
    q = GroupVectorQuantizer(65536, 128, num_groups=64, codebook_rank=128).to(DEV)
    q.track_usage = False
    rows = []
    with torch.no_grad():
        codebook = q.codebook()
        picks = torch.randint(0, 65536, (8192,), device=DEV)
        z = codebook[picks] + 0.5 * codebook.std() * torch.randn(8192, 128, device=DEV)
        exact = nearest_code_indices(z.double(), codebook.double())
        best = (z.double() - codebook.double()[exact]).pow(2).sum(1)

        def row(name, chosen):
            changed = chosen != exact
            n = int(changed.sum())
            gap = 0.0
            if n:
                got = (z.double()[changed] - codebook.double()[chosen[changed]]).pow(2).sum(1)
                gap = float(((got - best[changed]) / best[changed]).max())
            rows.append([name, n, f"{n / len(z):.2e}", f"{gap:.1e}"])

        matmul = torch.backends.cuda.matmul  # the new API only: mixing it with allow_tf32 makes torch raise
        saved = matmul.fp32_precision
        matmul.fp32_precision = "ieee"
        row("fp32 (quantizer forward)", q.quantize_tokens(z)[2])
        with torch.autocast("cuda", dtype=torch.bfloat16):
            row("bf16 autocast (quantizer forward)", q.quantize_tokens(z)[2])
            row("bf16 latents under bf16 autocast", q.quantize_tokens(z.bfloat16())[2])
        matmul.fp32_precision = "tf32"
        row("TF32 matmuls (quantizer forward)", q.quantize_tokens(z)[2])
        matmul.fp32_precision = saved
    print(markdown_table(["setting", "changed choices", "rate", "max relative distance gap"], rows))


def speed_and_memory():
    from diffusers.models.autoencoders.vae import VectorQuantizer

    print("\n## Quantizer speed on CUDA (fp32 search), ms (median of 10)\n")
    rows = []
    for n_tokens, n_codes in ((8192, 65536), (8192, 16384), (32768, 262144)):
        torch.manual_seed(0)
        q = GroupVectorQuantizer(n_codes, 128, num_groups=64, codebook_rank=128).to(DEV)
        ref = VectorQuantizer(n_codes, 128, beta=0.25, legacy=False).to(DEV)
        z = torch.randn(n_tokens // 256, 128, 16, 16, device=DEV, requires_grad=True)
        flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 128)
        with torch.no_grad():
            codebook = q.codebook()
            t_limit = cuda_ms(lambda: bare_limit(flat, codebook))
            t_fwd = cuda_ms(lambda: q(z))
            t_ref = cuda_ms(lambda: ref(z))

        def fwd_bwd(module):
            out = module(z)
            (out[0].sum() + out[1]).backward()

        t_fb = cuda_ms(lambda: fwd_bwd(q))
        t_ref_fb = cuda_ms(lambda: fwd_bwd(ref))
        rows.append([f"{n_tokens} x {n_codes}", f"{t_limit:.2f}", f"{t_fwd:.2f}", f"{t_fwd / t_limit:.2f}",
                     f"{t_ref:.2f}", f"{t_fwd / t_ref:.2f}", f"{t_fb:.2f}", f"{t_ref_fb:.2f}"])
        q = ref = z = None  # freed before the next size
        torch.cuda.empty_cache()
    print(markdown_table(["tokens x codes", "limit", "group-vq fwd", "/ limit", "diffusers fwd", "group-vq / diffusers",
                          "group-vq fwd+bwd", "diffusers fwd+bwd"], rows))

    print("\n## Extra peak CUDA memory of one forward (8,192 tokens, d=128), MiB beyond inputs + codebook/params\n")
    rows = []
    for n_codes in (16384, 65536, 262144):
        line = [n_codes]
        for name in ("group-vq", "diffusers"):
            torch.manual_seed(0)
            module = (GroupVectorQuantizer(n_codes, 128, num_groups=64, codebook_rank=128) if name == "group-vq"
                      else VectorQuantizer(n_codes, 128, beta=0.25, legacy=False)).to(DEV)
            z = torch.randn(32, 128, 16, 16, device=DEV)
            with torch.no_grad():
                if name == "group-vq":
                    module.codebook()
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                module(z)
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() - base
            codebook_bytes = n_codes * 128 * 4 if name == "group-vq" else 0
            line.append(f"{(peak - codebook_bytes) / 2**20:.1f}")
            module = z = None
            torch.cuda.empty_cache()
        rows.append(line)
    print(markdown_table(["codes", "group-vq", "diffusers"], rows))


def train_steps():
    from diffusers import VQModel

    print("\n## bf16 training steps on CUDA: paper ImageNet VQGAN (128x128, f=8, 65,536 codes, 64 groups), batch 32\n")
    config = GroupVQConfig.from_preset("imagenet")
    rows = []
    pixels = torch.rand(32, 3, 128, 128, device=DEV) * 2 - 1
    for name in ("GroupVQModel", "diffusers VQModel"):
        torch.manual_seed(0)
        if name == "GroupVQModel":
            model = GroupVQModel(config).to(DEV).train()
        else:
            model = VQModel(block_out_channels=tuple(config.block_out_channels), down_block_types=tuple(config.down_block_types),
                            up_block_types=tuple(config.up_block_types), layers_per_block=2, latent_channels=128,
                            num_vq_embeddings=65536, vq_embed_dim=128, sample_size=128).to(DEV).train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.5, 0.9))
        losses = []

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                if name == "GroupVQModel":
                    out = model(pixels)
                    rec, commit = out.reconstruction, out.commitment_loss
                else:
                    out = model(pixels)
                    rec, commit = out.sample, out.commit_loss.mean()
                loss = (rec.float() - pixels).abs().mean() + commit
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())

        ms = cuda_ms(step, repeats=10, warmup=3)
        finite = bool(torch.isfinite(torch.stack(losses)).all())
        first, last = losses[0].item(), losses[-1].item()
        rows.append([name, f"{ms:.1f}", f"{32 / ms * 1000:.0f}", finite, f"{first:.3f} -> {last:.3f}"])
        if name == "GroupVQModel":
            q_ms = cuda_ms(lambda: model.quantizer(torch.randn(32, 128, 16, 16, device=DEV)), repeats=10)
            rows[-1].append(f"{q_ms:.2f} ms ({q_ms / ms:.1%})")
        else:
            rows[-1].append("")
        model = opt = None
        torch.cuda.empty_cache()
    print(markdown_table(["model", "step ms", "images/s", "losses finite", "loss first -> last (13 steps)",
                          "quantizer fwd (share)"], rows))


def tokenizer_loop():
    """The loop of `tokenize_dataset` on CUDA: ``encode`` with the per-call checks off never synchronises (it can run
    ahead of the host), `HostTokens` (pinned, non-blocking copy) returns the encoder's indices, and the dataset's
    tokens match ``model.encode`` of each processed image (batch 1) up to near-ties that batching may flip."""
    import tempfile

    import datasets

    from groupvq_hf.data import demo_images
    from groupvq_hf.tokens import image_processor_at, tokenize_dataset
    from groupvq_hf.tokens.tokenization import HostTokens

    print("\n## Tokenizer loop on CUDA\n")
    datasets.disable_progress_bars()
    torch.manual_seed(0)
    model = GroupVQModel(GroupVQConfig.from_preset("imagenet")).eval().to(DEV)
    pixels = torch.rand(32, 3, 128, 128, device=DEV) * 2 - 1
    rows = []
    with torch.inference_mode():
        model.check_finite = False
        torch.cuda.set_sync_debug_mode("error")
        try:
            encoded = model.encode(pixels)
            synced = "none"
        except RuntimeError as err:
            synced = str(err).splitlines()[0][:80]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        model.check_finite = True
        rows.append(["encode (checks off) under sync_debug_mode('error')", synced])
        host = HostTokens(encoded.indices.to(torch.int32), torch.isfinite(encoded.latents).all())
        rows.append(["HostTokens == indices.cpu()", bool((host.numpy() == encoded.indices.int().cpu().numpy()).all())])
    with tempfile.TemporaryDirectory() as tmp:
        photos = os.path.join(tmp, "photos")
        os.makedirs(photos)
        for i, image in enumerate(demo_images()):
            image.save(os.path.join(photos, f"photo{i}.png"))
        tokenize_dataset(model, photos, os.path.join(tmp, "tokens"), 128, augment="flip", batch_size=4, progress=False)
        dataset = datasets.load_dataset(os.path.join(tmp, "tokens"), split="train")
        processor = image_processor_at(None, 128)
        differing, total = 0, 0
        with torch.inference_mode():
            for row in dataset:
                from PIL import Image

                view = processor(Image.open(row["key"]).convert("RGB"), return_tensors="pt")["pixel_values"].to(DEV)
                view = view.flip(-1) if row["augmentation"] == "flip" else view
                expected = model.encode(view).indices.flatten().cpu()
                differing += int((expected != torch.tensor(row["tokens"])).sum())
                total += expected.numel()
        rows.append([f"tokenize_dataset (batch 4) vs encode (batch 1): differing tokens of {total}", differing])
    print(markdown_table(["check", "result"], rows))


def main():
    props = torch.cuda.get_device_properties(0)
    print(f"# CUDA check: {props.name}, {props.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}")
    t0 = time.time()
    for part in (correctness, tokenizer_loop, precision, speed_and_memory, train_steps):
        part()
        print(f"\n({part.__name__}: {time.time() - t0:.0f} s elapsed)", flush=True)


if __name__ == "__main__":
    main()
