"""`AutoModel.from_pretrained(folder, trust_remote_code=True)` where groupvq_hf cannot be imported."""

import subprocess
import sys
from pathlib import Path

import torch

from groupvq_hf import GroupVQConfig, GroupVQModel

LOADER = Path(__file__).resolve().parent / "drivers" / "load_remote_code.py"


def test_remote_code_load_without_package(tmp_path, pixels):
    torch.manual_seed(0)
    model = GroupVQModel(GroupVQConfig.from_preset("tiny", group_sizes=[64, 64, 128], num_groups=3)).eval()
    model.save_pretrained(tmp_path / "model")
    for name in ("configuration_groupvq.py", "modeling_groupvq.py", "quantizer.py", "image_processing_groupvq.py"):
        assert (tmp_path / "model" / name).exists(), name
    torch.save(pixels, tmp_path / "pixels.pt")
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf_home")}
    result = subprocess.run(
        [sys.executable, str(LOADER), str(tmp_path / "model"), str(tmp_path / "pixels.pt"), str(tmp_path / "out.pt")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    remote = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        local = model(pixels)
        sizes = model.resize_codebook(512, mode="extend", seed=0)
    assert torch.equal(remote["reconstruction"], local.reconstruction)
    assert torch.equal(remote["indices"], local.indices)
    assert remote["sizes"] == sizes == [128, 128, 256]
    assert torch.equal(remote["codebook"], model.quantizer.codebook())
    assert remote["decoded"].shape == (1, 3, 16, 16)
