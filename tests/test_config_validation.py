"""Config and quantizer arguments: float hyperparameters must be finite, group lists must hold integers, a
`num_groups` contradicting `group_sizes` raises, and `sample_size` must suit the encoder's downsampling factor."""

import numpy as np
import pytest

from groupvq_hf import GroupVectorQuantizer, GroupVQConfig, GroupVQVAE

NAN, INF = float("nan"), float("inf")
SMALL_VAE = dict(num_vq_embeddings=64, latent_channels=4, norm_num_groups=8, block_out_channels=(8,))


@pytest.mark.parametrize(
    "preset, kwargs, match",
    [
        ("tiny", dict(commitment_beta=NAN), r"`commitment_beta` must be a number >= 0, finite"),
        ("tiny", dict(commitment_beta=INF), r"`commitment_beta` must be a number >= 0, finite"),
        ("tiny", dict(scaling_factor=NAN), r"`scaling_factor` must be a number > 0, finite"),
        ("tiny", dict(scaling_factor=0.0), r"`scaling_factor` must be a number > 0"),
        ("tiny", dict(core_std=INF), r"`core_std` must be a number"),
        ("tiny", dict(core_std=1e-300), r"`core_std` must be a number >= 1.17549e-38"),  # all-zero float32 cores
        ("vit-tiny", dict(mlp_ratio=NAN), r"`mlp_ratio` must be a number > 0, finite"),
        ("vit-tiny", dict(mlp_ratio=INF), r"`mlp_ratio` must be a number > 0, finite"),
        ("vit-tiny", dict(mlp_ratio=0.01), r"`mlp_ratio`=0.01 leaves the MLP no unit"),
    ],
)
def test_float_hyperparameters_must_be_finite_and_in_range(preset, kwargs, match):
    with pytest.raises(ValueError, match=match):
        GroupVQConfig.from_preset(preset, **kwargs)


@pytest.mark.parametrize("beta", [NAN, INF, True])
def test_quantizer_and_vae_refuse_a_non_finite_commitment_beta(beta):
    with pytest.raises(ValueError, match="`commitment_beta` must be a number >= 0"):
        GroupVectorQuantizer(64, 8, num_groups=4, commitment_beta=beta)
    with pytest.raises(ValueError, match="`commitment_beta` must be a number >= 0"):
        GroupVQVAE(**SMALL_VAE, commitment_beta=beta)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(codebook_size=64, group_sizes=[32.5, 31.5]), "`group_sizes` must be a non-empty list of positive ints"),
        (dict(codebook_size=64, group_sizes=[32.0, 32.0]), "`group_sizes` must be a non-empty list of positive ints"),
        (dict(codebook_size=2, group_sizes=[True, True]), "`group_sizes` must be a non-empty list of positive ints"),
        (dict(trained_group_sizes=[3.7] * 8), "`trained_group_sizes` needs one count per group"),
        (dict(trained_group_sizes=[True] * 8), "`trained_group_sizes` needs one count per group"),
    ],
)
def test_group_lists_must_hold_integers_not_floats_or_bools(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GroupVQConfig.from_preset("tiny", **kwargs)


def test_numpy_integer_group_lists_are_accepted_as_python_ints():
    sizes, ranks, trained = np.array([64, 64, 128]), np.array([8, 8, 16]), np.array([64, 0, 100])
    config = GroupVQConfig.from_preset("tiny", group_sizes=sizes, group_ranks=ranks, trained_group_sizes=trained)
    assert (config.group_sizes, config.group_ranks, config.trained_group_sizes) == ([64, 64, 128], [8, 8, 16], [64, 0, 100])
    assert all(type(v) is int for key in ("group_sizes", "group_ranks", "trained_group_sizes") for v in getattr(config, key))
    vae = GroupVQVAE(**SMALL_VAE, group_sizes=[16, 48], trained_group_sizes=np.array([16, 2]))
    assert vae.config.trained_group_sizes == [16, 2] and type(vae.config.trained_group_sizes[0]) is int
    with pytest.raises(ValueError, match="`trained_group_sizes` needs one count per group"):
        GroupVQVAE(**SMALL_VAE, group_sizes=[16, 48], trained_group_sizes=[16.0, 2.5])


def test_num_groups_contradicting_group_sizes_raises_naming_both_unset_follows_the_list():
    match = r"`group_sizes` has 2 entries but `num_groups`=4; they must agree"
    with pytest.raises(ValueError, match=match):
        GroupVQConfig.from_preset("tiny", codebook_size=64, num_groups=4, group_sizes=[32, 32])
    with pytest.raises(ValueError, match=match):
        GroupVQConfig(codebook_size=64, num_groups=4, group_sizes=[32, 32])
    with pytest.raises(ValueError, match=match):  # the diffusers shell applies the same rule
        GroupVQVAE(**SMALL_VAE, num_groups=4, group_sizes=[32, 32])
    # left unset (or agreeing), the list decides, and a saved config (both recorded) loads again
    assert GroupVQConfig().num_groups == 64  # the paper's ImageNet setting
    assert GroupVQConfig(codebook_size=64, group_sizes=[16, 48]).num_groups == 2
    assert GroupVQConfig(codebook_size=64, num_groups=None, group_sizes=[16, 48]).num_groups == 2
    preset = GroupVQConfig.from_preset("tiny", group_sizes=[64, 64, 128])  # the preset's 8 groups give way to the list
    assert (preset.num_groups, preset.group_sizes) == (3, [64, 64, 128])
    again = GroupVQConfig.from_dict(preset.to_dict())
    assert (again.num_groups, again.group_sizes) == (3, [64, 64, 128])


@pytest.mark.parametrize(
    "preset, sample_size, factor",
    [("tiny", 30, 4), ("tiny", 66, 4), ("simvq-tiny", 31, 2), ("imagenet", 100, 8), ("simvq-imagenet", 132, 8)],
)
def test_sample_size_must_be_a_multiple_of_the_downsampling_factor(preset, sample_size, factor):
    with pytest.raises(ValueError, match=rf"`sample_size`={sample_size} must be divisible by the downsampling factor {factor}"):
        GroupVQConfig.from_preset(preset, sample_size=sample_size)
    config = GroupVQConfig.from_preset(preset, sample_size=sample_size + factor - sample_size % factor)
    assert config.sample_size % config.downsample_factor == 0
