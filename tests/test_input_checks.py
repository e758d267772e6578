"""Inputs both model shells take the same way (issue 19's smaller items): pixel dtypes, pixel range, resize seeds,
empty token grids, checkpoints without the frozen cores."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_vq_model import tiny_groupvq_model, tiny_vae


def _encode_indices(shell, pixels):
    if hasattr(shell, "quantize"):  # GroupVQVAE: latents, then its quantizer
        return shell.quantize(shell.encode(pixels).latents)[2][2]
    return shell.encode(pixels).indices


@pytest.mark.parametrize("make", [tiny_groupvq_model, tiny_vae])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_pixels_of_another_float_dtype_are_converted_to_the_models(make, dtype, pixels):
    shell = make()
    given = pixels.to(dtype)
    with torch.no_grad():
        expected = _encode_indices(shell, given.float())
        torch.testing.assert_close(_encode_indices(shell, given), expected, rtol=0, atol=0)
        if hasattr(shell, "quantize"):
            assert shell(given).sample.dtype == torch.float32
        else:
            assert shell(given).reconstruction.dtype == torch.float32


@pytest.mark.parametrize("make", [tiny_groupvq_model, tiny_vae])
def test_pixels_clearly_outside_minus_one_one_warn_once(make, pixels):
    shell = make()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            _encode_indices(shell, pixels)  # in range: no warning
            assert not caught
            _encode_indices(shell, (pixels + 1) * 127.5)  # [0, 255]
            _encode_indices(shell, (pixels + 1) * 127.5)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "[-1, 1]" in messages[0] and "255" in messages[0]


@pytest.mark.parametrize("make", [tiny_groupvq_model, tiny_vae])
@pytest.mark.parametrize("seed", [1.5, 2**64, -1, "3", True])
def test_a_resize_seed_that_is_no_64_bit_integer_is_a_value_error(make, seed):
    shell = make()
    with pytest.raises(ValueError, match="`seed`"):
        shell.resize_codebook(2 * shell.config.get("num_vq_embeddings", None) if hasattr(shell, "quantize")
                              else 2 * shell.config.codebook_size, seed=seed)


def test_a_large_64_bit_seed_and_numpy_integers_still_resize():
    import numpy as np

    model = tiny_groupvq_model()
    n = model.config.codebook_size
    model.resize_codebook(2 * n, seed=2**64 - 1)
    model.resize_codebook(4 * n, seed=np.int64(3))


@pytest.mark.parametrize("grid", [(1, 0, 4), (1, 4, 0), (1, 0, 0)])
def test_an_empty_token_grid_is_a_clear_error_in_both_shells(grid):
    model, vae = tiny_groupvq_model(), tiny_vae(lookup_from_codebook=True)
    indices = torch.zeros(grid, dtype=torch.long)
    with pytest.raises(ValueError, match="`indices` .*at least one token"):
        model.decode_indices(indices)
    with pytest.raises(ValueError, match="`h` .*at least one token"):
        vae.decode(indices, force_not_quantize=True)


@pytest.mark.parametrize("make", [tiny_groupvq_model, tiny_vae])
def test_a_checkpoint_without_the_frozen_core_is_refused(make, tmp_path):
    shell = make()
    shell.save_pretrained(tmp_path)
    weights_file = next(tmp_path.glob("*.safetensors"))
    weights = load_file(str(weights_file))
    core = [key for key in weights if key.split(".")[-1].startswith("core")]
    assert core  # quantizer.core (GroupVQModel) / quantize.core (GroupVQVAE)
    for key in core:
        weights.pop(key)
    save_file(weights, str(weights_file), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"core.*the codebook"):
        type(shell).from_pretrained(tmp_path)


@pytest.mark.parametrize("make", [tiny_groupvq_model, tiny_vae])
def test_a_checkpoint_whose_core_has_another_shape_is_refused_even_when_mismatched_sizes_are_ignored(make, tmp_path):
    """``ignore_mismatched_sizes=True`` would leave the core an uninitialised buffer (it is never drawn on load)."""
    shell = make()
    shell.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"core \[\d+, \d+, \d+\] \(the model wants \[2, .*resize_codebook"):
        type(shell).from_pretrained(tmp_path, num_groups=2, ignore_mismatched_sizes=True)
