#!/usr/bin/env bash
# One prepared run on a lent CUDA machine (an H200 here), from the repository root:
#   bash benchmarks/device_check.sh OUT_DIR
# Wheels of the packages the machine lacks (diffusers, datasets, evaluate, ...; see benchmarks/RESULTS.md) are
# expected in .whl/. Each part has its own time limit and writes its table to OUT_DIR, so a part that runs out of
# time leaves the others' results.
set -u
OUT_DIR="${1:?usage: bash benchmarks/device_check.sh OUT_DIR}"
mkdir -p "$OUT_DIR"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 - <<'EOF' 2>&1 | tee "$OUT_DIR/versions.txt"
import os, torch, transformers, diffusers, datasets, accelerate, groupvq_hf
print(torch.cuda.get_device_name(0), "| torch", torch.__version__, "| transformers", transformers.__version__,
      "| diffusers", diffusers.__version__, "| datasets", datasets.__version__, "| accelerate", accelerate.__version__,
      "|", os.cpu_count(), "CPU cores")
EOF
# 1. CUDA correctness and quantizer speed after the package's restructure.
timeout 130 python3 benchmarks/cuda_check.py > "$OUT_DIR/cuda_check.md" 2>&1; echo "cuda_check rc $?" >> "$OUT_DIR/cuda_check.md"
# 2. Tokenizing a dataset: decode only, encode only, end to end (tiny and imagenet presets).
timeout 190 python3 benchmarks/bench_tokenize.py --device cuda --memory_images 0 > "$OUT_DIR/tokenize.md" 2>&1
echo "bench_tokenize rc $?" >> "$OUT_DIR/tokenize.md"
# 2b. The same loop with the encoder replaced by a sleep at the GPU's measured rate (0.67 ms per image: 1,500
# images/s at 128 px): the host side of the loop (workers, pinned copies, normalisation on the device, shard writes)
# without the encoder's kernel launches. Compare with part 2's end to end.
timeout 50 python3 benchmarks/bench_tokenize.py --device cuda --presets imagenet --memory_images 0 --write_rows 0 \
  --simulated_encoder_ms 0.67 > "$OUT_DIR/tokenize_simulated.md" 2>&1
echo "bench_tokenize simulated rc $?" >> "$OUT_DIR/tokenize_simulated.md"
# 3. Training throughput at the paper's setting (imagenet preset, 128 px, bf16): reduced vs full JPEG decoding.
timeout 180 python3 benchmarks/bench_train_throughput.py --workers 4 > "$OUT_DIR/train_throughput.md" 2>&1
echo "bench_train_throughput rc $?" >> "$OUT_DIR/train_throughput.md"
