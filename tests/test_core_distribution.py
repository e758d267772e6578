"""The frozen core's distribution P = N(0, core_std^2 I): SimVQ's initial code scale, recorded in the config, used by
every resize (Algorithm 2), and N(0, I) for checkpoints saved before `core_std` existed."""

import json

import pytest
import torch

from groupvq_hf import GroupVectorQuantizer, GroupVQConfig, GroupVQModel, GroupVQVAE
from groupvq_hf.quantizer import LEGACY_CORE_STD


@pytest.mark.parametrize("dim", [16, 64])
@pytest.mark.parametrize("projector,low,high", [("linear", 0.9, 1.1), ("mlp", 0.25, 0.6), ("linear+mlp", 0.9, 1.3)])
def test_initial_codes_have_simvq_scale(dim, projector, low, high):
    # SimVQ: codebook N(0, 1/d) through a default nn.Linear(d, d) -> per-coordinate std 1/sqrt(3d).
    torch.manual_seed(0)
    q = GroupVectorQuantizer(4096, dim, num_groups=8, projector=projector)
    assert q.core_std == pytest.approx(dim**-0.5)
    ratio = q.codebook().std().item() / (3 * dim) ** -0.5
    assert low < ratio < high, ratio
    assert q.core.std().item() == pytest.approx(dim**-0.5, rel=0.05)


def test_legacy_core_std_gives_the_old_initial_scale():
    torch.manual_seed(0)
    q = GroupVectorQuantizer(4096, 64, num_groups=8, core_std=LEGACY_CORE_STD)
    assert q.codebook().std().item() == pytest.approx(3**-0.5, rel=0.1)


def test_config_records_core_std(tmp_path):
    config = GroupVQConfig.from_preset("tiny")
    assert config.core_std == pytest.approx(config.codebook_dim**-0.5)
    GroupVQModel(config).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["core_std"] == pytest.approx(0.25)
    assert GroupVQConfig.from_pretrained(tmp_path).core_std == pytest.approx(0.25)
    assert GroupVQConfig.from_preset("tiny", core_std=0.5).core_std == 0.5
    for bad in (0, -1.0, float("nan"), "big", True):
        with pytest.raises(ValueError, match="core_std"):
            GroupVQConfig.from_preset("tiny", core_std=bad)


def _legacy_model(tmp_path):
    """A model folder as saved before `core_std` existed: N(0, I) cores and no `core_std` key in config.json."""
    torch.manual_seed(0)
    model = GroupVQModel(GroupVQConfig.from_preset("tiny", core_std=1.0)).eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["core_std"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    return model


def test_pre_change_checkpoint_loads_resizes_and_round_trips(tmp_path, pixels):
    old = _legacy_model(tmp_path / "old")
    loaded = GroupVQModel.from_pretrained(tmp_path / "old").eval()
    assert loaded.config.core_std == 1.0 and loaded.quantizer.core_std == 1.0
    for key, value in old.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    torch.testing.assert_close(loaded(pixels).reconstruction, old(pixels).reconstruction, rtol=0, atol=0)
    trained = [core.clone() for core in loaded.quantizer.cores()]
    loaded.resize_codebook(512, mode="extend", seed=3)
    # exactly the rows the code before `core_std` drew: plain N(0, I) from a generator seeded with 3
    generator = torch.Generator().manual_seed(3)
    for core, before in zip(loaded.quantizer.cores(), trained):
        assert torch.equal(core[: before.shape[0]], before)
        assert torch.equal(core[before.shape[0] :], torch.randn(before.shape[0], before.shape[1], generator=generator))
    loaded.save_pretrained(tmp_path / "resized")
    again = GroupVQModel.from_pretrained(tmp_path / "resized")
    assert again.config.core_std == 1.0 and again.config.codebook_size == 512
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key


def test_pre_change_diffusers_checkpoint_keeps_n01(tmp_path):
    _legacy_model(tmp_path / "old")
    vae = GroupVQVAE.from_groupvq(GroupVQModel.from_pretrained(tmp_path / "old"))
    assert vae.config.core_std == 1.0
    vae.save_pretrained(tmp_path / "vae")
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    del config["core_std"]
    (tmp_path / "vae" / "config.json").write_text(json.dumps(config))
    assert GroupVQVAE.from_pretrained(tmp_path / "vae").quantize.core_std == 1.0
    assert GroupVQVAE(num_vq_embeddings=64, latent_channels=8, norm_num_groups=8).config.core_std == pytest.approx(8**-0.5)


@pytest.mark.parametrize("mode", ["extend", "resample"])
def test_resize_draws_from_the_recorded_distribution(mode):
    q = GroupVectorQuantizer(64, 16, num_groups=4, core_std=0.3)
    before = [core.clone() for core in q.cores()]
    q.resize_codebook(64 * 512, mode=mode, seed=0)
    fresh = torch.cat([core[16 if mode == "extend" else 0 :] for core in q.cores()])
    assert fresh.std().item() == pytest.approx(0.3, rel=0.02)
    assert fresh.mean().abs().item() < 0.01
    generator = torch.Generator().manual_seed(0)
    start = 16 if mode == "extend" else 0
    for core, old in zip(q.cores(), before):
        expected = torch.randn(core.shape[0] - start, 16, generator=generator) * 0.3
        assert torch.equal(core[start:], expected)
        if mode == "extend":
            assert torch.equal(core[:16], old)


def test_resize_to_an_impossible_size_is_refused_before_allocating():
    q = GroupVectorQuantizer(256, 16, num_groups=8)
    with pytest.raises(ValueError, match=r"new_size.*GiB"):
        q.resize_codebook(2**40)
    assert q.codebook_size == 256


def test_non_finite_latents_raise_instead_of_code_zero(tiny_model, pixels):
    q = GroupVectorQuantizer(64, 8, num_groups=4)
    z = torch.randn(2, 8, 4, 4)
    for bad in (float("nan"), float("inf")):
        z_bad = z.clone()
        z_bad[1, 3, 2, 2] = bad
        with pytest.raises(ValueError, match=r"`z`.*NaN or inf in 1 of 32 tokens"):
            q(z_bad)
    q.check_finite = False  # the check can be turned off for speed
    q(z_bad)
    broken = pixels.clone()
    broken[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        tiny_model.encode(broken)
    with pytest.raises(ValueError, match="NaN or inf"):
        tiny_model(broken)


def test_config_from_an_old_diffusers_dict_keeps_n01():
    vae_config = dict(GroupVQVAE(num_vq_embeddings=64, latent_channels=8, norm_num_groups=8, num_groups=4).config)
    assert GroupVQModel.config_from_diffusers(vae_config).core_std == pytest.approx(8**-0.5)
    del vae_config["core_std"]  # saved before the field existed
    assert GroupVQModel.config_from_diffusers(vae_config).core_std == 1.0
