"""`AutoModel.from_pretrained(folder, trust_remote_code=True)` where groupvq_hf cannot be imported."""

import subprocess
import sys
import textwrap

import torch

from groupvq_hf import GroupVQConfig, GroupVQModel

LOADER = textwrap.dedent(
    """
    import sys
    sys.modules["groupvq_hf"] = None  # make the package unimportable: only the folder's code may be used
    import torch
    from transformers import AutoImageProcessor, AutoModel
    folder, pixels_path, out_path = sys.argv[1:4]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    assert "transformers_modules" in type(model).__module__, type(model).__module__
    processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    assert "transformers_modules" in type(processor).__module__
    pixels = torch.load(pixels_path)
    with torch.no_grad():
        out = model(pixels)
        sizes = model.resize_codebook(2 * model.config.codebook_size, mode="extend", seed=0)
        decoded = model.decode_indices(torch.full((1, 4, 4), sum(sizes) - 1))
    torch.save({"reconstruction": out.reconstruction, "indices": out.indices, "sizes": sizes,
                "decoded": decoded, "codebook": model.quantizer.codebook()}, out_path)
    """
)


def test_remote_code_load_without_package(tmp_path, pixels):
    torch.manual_seed(0)
    model = GroupVQModel(GroupVQConfig.from_preset("tiny", group_sizes=[64, 64, 128], num_groups=3)).eval()
    model.save_pretrained(tmp_path / "model")
    for name in ("configuration_groupvq.py", "modeling_groupvq.py", "quantizer.py", "image_processing_groupvq.py"):
        assert (tmp_path / "model" / name).exists(), name
    torch.save(pixels, tmp_path / "pixels.pt")
    script = tmp_path / "load.py"
    script.write_text(LOADER)
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf_home")}
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "model"), str(tmp_path / "pixels.pt"), str(tmp_path / "out.pt")],
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
