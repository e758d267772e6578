"""A resume after files of a local dataset were deleted says how many rows went missing (issue 19)."""

from pathlib import Path

from conftest import train_in_process
from PIL import Image

TINY = [
    "--model_config", "tiny", "--resolution", "32", "--train_batch_size", "2", "--perceptual_weight", "0",
    "--dataloader_num_workers", "0", "--logging_steps", "1", "--validation_steps", "0", "--report_to", "none",
    "--num_validation_images", "1", "--num_validation_usage_images", "0", "--checkpointing_steps", "2", "--seed", "3",
]  # fmt: skip


def _train(folder: Path, output_dir: Path, steps: int, caplog, *extra: str) -> str:
    """scripts/train.py's code in this process (tests/test_training.py runs the script itself); its warnings."""
    caplog.clear()
    with caplog.at_level("WARNING"):
        train_in_process(["--output_dir", str(output_dir), "--dataset", str(folder), "--max_train_steps", str(steps),
                          *TINY, *extra])  # fmt: skip
    return caplog.text


def test_a_resume_after_files_were_deleted_says_how_many_rows_are_missing(tmp_path, caplog):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(10):
        Image.new("RGB", (40, 36), (25 * i, 100, 200 - 10 * i)).save(folder / f"img_{i}.png")
    _train(folder, tmp_path / "run", 2, caplog)
    resumed = _train(folder, tmp_path / "run", 3, caplog, "--resume_from_checkpoint", "latest")
    assert "rows fewer" not in resumed  # nothing deleted: no warning
    for i in (7, 8, 9):
        (folder / f"img_{i}.png").unlink()
    resumed = _train(folder, tmp_path / "run", 5, caplog, "--resume_from_checkpoint", "latest")
    assert "has 3 rows fewer than when checkpoint-2 was written (10 then, 7 now)" in resumed, resumed[-3000:]
