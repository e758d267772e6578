"""A resume after files of a local dataset were deleted says how many rows went missing (issue 19)."""

import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--model_config", "tiny", "--resolution", "32", "--train_batch_size", "2", "--perceptual_weight", "0",
    "--dataloader_num_workers", "0", "--logging_steps", "1", "--validation_steps", "0", "--report_to", "none",
    "--num_validation_images", "1", "--num_validation_usage_images", "0", "--checkpointing_steps", "2", "--seed", "3",
]  # fmt: skip


def _train(folder: Path, output_dir: Path, steps: int, *extra: str) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "scripts/train.py", "--output_dir", str(output_dir), "--dataset", str(folder),
               "--max_train_steps", str(steps), *TINY, *extra]  # fmt: skip
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done.stdout + done.stderr


def test_a_resume_after_files_were_deleted_says_how_many_rows_are_missing(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(10):
        Image.new("RGB", (40, 36), (25 * i, 100, 200 - 10 * i)).save(folder / f"img_{i}.png")
    _train(folder, tmp_path / "run", 2)
    resumed = _train(folder, tmp_path / "run", 3, "--resume_from_checkpoint", "latest")
    assert "rows fewer" not in resumed  # nothing deleted: no warning
    for i in (7, 8, 9):
        (folder / f"img_{i}.png").unlink()
    resumed = _train(folder, tmp_path / "run", 5, "--resume_from_checkpoint", "latest")
    assert "has 3 rows fewer than when checkpoint-2 was written (10 then, 7 now)" in resumed, resumed[-3000:]
