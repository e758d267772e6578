"""GroupVQVAE <-> GroupVQModel, VQModel -> GroupVQVAE, folder conversion and scripts/convert_checkpoint.py."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import VQ_TEST_INIT, tiny_groupvq_model
from diffusers import VQModel

from groupvq_hf import GroupVQModel, GroupVQVAE
from groupvq_hf.hub.conversion import checkpoint_kind, convert_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "overrides",
    [{}, {"group_sizes": [64, 192], "group_ranks": [8, 16], "projector": "linear+mlp"}],
    ids=["uniform", "heterogeneous-mlp"],
)
@torch.no_grad()
def test_lossless_conversion_both_ways(overrides):
    model = tiny_groupvq_model(**overrides)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    ref = model(x)
    vae = GroupVQVAE.from_groupvq(model, lookup_from_codebook=True)
    assert vae.config.lookup_from_codebook and vae.config.scaling_factor == model.config.scaling_factor
    out = vae(x)
    assert torch.equal(out.sample, ref.reconstruction) and torch.equal(out.commit_loss, ref.commitment_loss)
    latents = vae.encode(x).latents
    assert torch.equal(latents, ref.latents)
    assert torch.equal(vae.quantize(latents)[2][2], ref.indices)
    tokens = vae.decode(ref.indices, force_not_quantize=True).sample
    assert torch.equal(tokens, model.decode_indices(ref.indices))
    back = GroupVQModel.from_diffusers(vae)
    assert back.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), model.state_dict().values()))
    assert torch.equal(back(x).reconstruction, ref.reconstruction)


def test_from_groupvq_rejects_bad_input():
    with pytest.raises(ValueError, match="GroupVQModel"):
        GroupVQVAE.from_groupvq(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="may be overridden"):
        GroupVQVAE.from_groupvq(tiny_groupvq_model(), latent_channels=4)


@torch.no_grad()
def test_from_vqmodel_keeps_encoder_decoder_and_seeds_quantizer():
    torch.manual_seed(0)
    plain = VQModel(**VQ_TEST_INIT, num_vq_embeddings=32).eval()
    vae = GroupVQVAE.from_vqmodel(plain, num_groups=4, codebook_rank=2, seed=3)
    again = GroupVQVAE.from_vqmodel(plain, num_groups=4, codebook_rank=2, seed=3)
    assert vae.quantize.codebook_size == 32 and vae.quantize.num_groups == 4
    plain_state = plain.state_dict()
    for key, value in vae.state_dict().items():
        if key.startswith("quantize."):
            assert torch.equal(value, again.state_dict()[key])  # seeded: reproducible
        else:
            assert torch.equal(value, plain_state[key])
    h = torch.randn(2, 3, 8, 8)
    expected = plain.decode(h, force_not_quantize=True).sample
    assert torch.allclose(vae.decode(h, force_not_quantize=True).sample, expected, atol=1e-5)
    assert not vae.training  # the mode of the source model
    bigger = GroupVQVAE.from_vqmodel(plain, num_vq_embeddings=128, num_groups=8, seed=0)
    assert bigger.config.num_vq_embeddings == 128 and bigger.quantize.group_sizes == [16] * 8
    mixed = GroupVQVAE.from_vqmodel(plain, group_sizes=[8, 24], group_ranks=[2, 3], seed=0)
    assert mixed.config.num_vq_embeddings == 32 and mixed.quantize.group_ranks == [2, 3]
    with pytest.raises(ValueError, match="VQModel"):
        GroupVQVAE.from_vqmodel(torch.nn.Linear(2, 2))


@torch.no_grad()
def test_convert_folders_both_ways_and_import_vqmodel(tmp_path):
    model = tiny_groupvq_model()
    model.save_pretrained(tmp_path / "tf")
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    ref = model(x).reconstruction
    assert checkpoint_kind(tmp_path / "tf") == "groupvq_model"
    assert convert_checkpoint(tmp_path / "tf", tmp_path / "df") == "groupvq_vae"
    assert checkpoint_kind(tmp_path / "df") == "groupvq_vae"
    assert torch.equal(GroupVQVAE.from_pretrained(tmp_path / "df")(x).sample, ref)
    assert convert_checkpoint(tmp_path / "df", tmp_path / "tf2") == "groupvq_model"
    assert torch.equal(GroupVQModel.from_pretrained(tmp_path / "tf2")(x).reconstruction, ref)
    # converted over the other library's save: its weights are not carried over (a folder with both loads either)
    shutil.copytree(tmp_path / "tf", tmp_path / "held_tf")
    assert convert_checkpoint(tmp_path / "tf2", tmp_path / "held_tf") == "groupvq_vae"
    assert not (tmp_path / "held_tf" / "model.safetensors").exists()
    shutil.copytree(tmp_path / "df", tmp_path / "held_df")
    assert convert_checkpoint(tmp_path / "df", tmp_path / "held_df") == "groupvq_model"
    assert not (tmp_path / "held_df" / "diffusion_pytorch_model.safetensors").exists()
    assert torch.equal(GroupVQModel.from_pretrained(tmp_path / "held_df")(x).reconstruction, ref)
    # a symlinked folder is written in place (as the libraries write it): what the conversion replaces goes all the same
    shutil.copytree(tmp_path / "df", tmp_path / "linked_target")
    (tmp_path / "linked_target" / "discriminator.safetensors").write_bytes(b"of the model this folder held")
    (tmp_path / "linked").symlink_to(tmp_path / "linked_target", target_is_directory=True)
    assert convert_checkpoint(tmp_path / "df", tmp_path / "linked") == "groupvq_model"
    left = sorted(p.name for p in (tmp_path / "linked_target").iterdir())
    assert "model.safetensors" in left and "diffusion_pytorch_model.safetensors" not in left
    assert "discriminator.safetensors" not in left
    torch.manual_seed(0)
    VQModel(**VQ_TEST_INIT).save_pretrained(tmp_path / "pipe" / "vqvae")
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    with pytest.raises(ValueError, match="subfolder"):
        checkpoint_kind(tmp_path / "pipe")
    kind = convert_checkpoint(tmp_path / "pipe", tmp_path / "imported", subfolder="vqvae", num_groups=4, seed=0)
    assert kind == "groupvq_vae"
    assert GroupVQVAE.from_pretrained(tmp_path / "imported").quantize.num_groups == 4
    with pytest.raises(ValueError, match="`to`"):
        convert_checkpoint(tmp_path / "pipe", tmp_path / "x", subfolder="vqvae", to="groupvq_model")
    with pytest.raises(ValueError, match="only apply"):
        convert_checkpoint(tmp_path / "df", tmp_path / "x", num_groups=2)


def test_convert_checkpoint_script(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("convert_checkpoint", REPO / "scripts" / "convert_checkpoint.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    tiny_groupvq_model().save_pretrained(tmp_path / "tf")
    # as a user runs it: `python scripts/convert_checkpoint.py SRC DST` from the repository root
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "scripts/convert_checkpoint.py", str(tmp_path / "tf"), str(tmp_path / "df")]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(done.stdout.strip().splitlines()[-1])
    assert printed == {"saved": str(tmp_path / "df"), "kind": "groupvq_vae"}
    # the same folder as source and destination is refused (a diffusers folder converted in place no longer loads)
    before = (tmp_path / "df" / "config.json").read_text()
    for same in (tmp_path / "df", tmp_path / "df" / "."):
        with pytest.raises(ValueError, match="`dst`.*same folder as `src`"):
            script.main([str(tmp_path / "df"), str(same)])
    assert (tmp_path / "df" / "config.json").read_text() == before
    GroupVQVAE.from_pretrained(tmp_path / "df")
    assert json.loads((tmp_path / "df" / "config.json").read_text())["_class_name"] == "GroupVQVAE"
    script.main([str(tmp_path / "df"), str(tmp_path / "tf2"), "--to", "groupvq_model"])
    assert json.loads((tmp_path / "tf2" / "config.json").read_text())["model_type"] == "groupvq"
    # A pipeline folder: its GroupVQVAE component switched to a remote-code custom component.
    shutil.copytree(tmp_path / "df", tmp_path / "pipe" / "vqvae")
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({"vqvae": ["groupvq_hf.vq_model", "GroupVQVAE"]}))
    script.main([str(tmp_path / "pipe"), str(tmp_path / "remote"), "--pipeline_components", "remote_code"])
    assert json.loads((tmp_path / "remote" / "model_index.json").read_text()) == {"vqvae": ["vq_model", "GroupVQVAE"]}
