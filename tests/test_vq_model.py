"""GroupVQVAE: the diffusers VQModel shell around GroupVectorQuantizer (issue 3): construction, VQModel behaviour,
codebook resizing and robustness. Conversion, saving / remote code and diffusers' generic model checks have files of
their own (test_vq_model_conversion.py, test_vq_model_saving.py, test_vq_model_diffusers_checks.py)."""

import inspect

import pytest
import torch
from conftest import TINY, VQ_TEST_INIT, dummy_inputs, tiny_groupvq_model, tiny_vae
from diffusers import VQModel
from diffusers.models.autoencoders.vae import DecoderOutput

from groupvq_hf import GroupVectorQuantizer, GroupVQModel, GroupVQVAE
from groupvq_hf.quantizer import QUANTIZER_CONFIG_KEYS


# --------------------------------------------------------------------------------------------- construction
def test_accepts_every_vqmodel_argument_with_vqmodel_defaults():
    base = inspect.signature(VQModel.__init__).parameters
    ours = inspect.signature(GroupVQVAE.__init__).parameters
    for name, param in base.items():
        assert name in ours and ours[name].default == param.default, name
    extras = set(ours) - set(base)
    assert extras == {*QUANTIZER_CONFIG_KEYS, "trained_group_sizes"}
    vae = GroupVQVAE(**VQ_TEST_INIT)
    assert isinstance(vae, VQModel)
    assert type(vae.quantize) is GroupVectorQuantizer
    assert (vae.quantize.codebook_size, vae.quantize.codebook_dim, vae.quantize.num_groups) == (256, 3, 1)
    assert "quantize.embedding.weight" not in vae.state_dict()


def test_group_arguments_reach_quantizer_and_config():
    vae = tiny_vae(vq_embed_dim=6, projector="linear+mlp", commitment_beta=0.5, group_sizes=[16, 48],
                   group_ranks=[2, 3], num_groups=1)
    q = vae.quantize
    assert (q.codebook_size, q.codebook_dim, q.group_sizes, q.group_ranks) == (64, 6, [16, 48], [2, 3])
    assert (q.projector, q.commitment_beta) == ("linear+mlp", 0.5)
    assert vae.config.num_groups == 2 and vae.config.group_sizes == [16, 48]
    assert vae.quant_conv.out_channels == 6 and vae.post_quant_conv.in_channels == 6


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_vq_embeddings": 65, "num_groups": 4}, "num_vq_embeddings"),
        ({"num_vq_embeddings": 0}, "num_vq_embeddings"),
        ({"vq_embed_dim": 0}, "vq_embed_dim"),
        ({"projector": "conv"}, "projector"),
        ({"norm_type": "layer"}, "norm_type"),
        ({"group_sizes": [32, 16]}, "group_sizes"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GroupVQVAE(**{**TINY, **kwargs})


# --------------------------------------------------------------------------------------------- VQModel behaviour
@torch.no_grad()
def test_encode_decode_forward_behave_as_vqmodel():
    vae = tiny_vae()
    x = dummy_inputs()["sample"]
    latents = vae.encode(x).latents
    assert torch.equal(latents, vae.quant_conv(vae.encoder(x)))  # pre-quantisation latents
    assert vae.encode(x, return_dict=False)[0].shape == latents.shape == (4, 8, 16, 16)
    quantized, loss, (_, _, indices) = vae.quantize(latents)
    decoded = vae.decode(latents)
    assert isinstance(decoded, DecoderOutput) and decoded.sample.shape == x.shape
    assert torch.equal(decoded.sample, vae.decode(quantized, force_not_quantize=True).sample)
    assert torch.equal(decoded.commit_loss, loss) and loss.ndim == 0
    assert torch.equal(vae.decode(quantized, force_not_quantize=True).commit_loss, torch.zeros(4))
    out = vae(x)
    assert torch.equal(out.sample, decoded.sample) and torch.equal(out.commit_loss, loss)
    sample, commit = vae(x, return_dict=False)
    assert torch.equal(sample, out.sample) and torch.equal(commit, loss)
    # Codes are the quantizer's: every quantised latent is a row of the codebook.
    codes = quantized.permute(0, 2, 3, 1).reshape(-1, 8)
    assert torch.allclose(codes, vae.quantize.codebook()[indices.flatten()], atol=1e-6)


@torch.no_grad()
def test_token_decoding_with_lookup_from_codebook():
    vae = tiny_vae(lookup_from_codebook=True)
    x = dummy_inputs()["sample"]
    latents = vae.encode(x).latents
    indices = vae.quantize(latents)[2][2]
    expected = vae.decode(latents)  # quantises: the same codes as the token lookup
    assert indices.shape == (4, 16, 16) and indices.dtype == torch.long
    for shape in (None, (4, 16, 16, 8), (4, 16, 16, vae.config.latent_channels)):
        out = vae.decode(indices, force_not_quantize=True, shape=shape)
        assert torch.allclose(out.sample, expected.sample, atol=1e-5)
    # aMUSEd passes flat token ids with the shape.
    flat = vae.decode(indices.view(4, -1), force_not_quantize=True, shape=(4, 16, 16, 8)).sample
    assert torch.allclose(flat, expected.sample, atol=1e-5)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda v: v.encode(torch.randn(1, 4, 32, 32)), "channels"),
        (lambda v: v.encode(torch.randn(1, 3, 31, 32)), "divisible"),
        (lambda v: v.encode([[0.0]]), "`x`"),
        (lambda v: v(torch.randn(3, 32, 32)), "`sample`"),
        (lambda v: v.decode(torch.randn(1, 3, 8, 8)), "vq_embed_dim=8"),
        (lambda v: v.decode(torch.zeros(1, 8, 8, dtype=torch.long), force_not_quantize=True), "`h`"),
    ],
)
def test_bad_inputs_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call(tiny_vae())


@pytest.mark.parametrize(
    "pixels",
    [torch.randn(1, 4, 32, 32), torch.randn(1, 3, 31, 32), torch.zeros(1, 3, 32, 32, dtype=torch.uint8),
     torch.randn(3, 32, 32), torch.empty(0, 3, 32, 32), torch.full((1, 3, 32, 32), float("nan"))],
)
def test_both_shells_check_pixels_by_one_rule(pixels):
    """GroupVQModel's `pixel_values` and GroupVQVAE's `x` meet the same checks, in the same words."""
    vae, model = tiny_vae(), tiny_groupvq_model()
    with pytest.raises(ValueError) as from_vae:
        vae.encode(pixels)
    with pytest.raises(ValueError) as from_model:
        model.encode(pixels)
    assert str(from_vae.value).replace("`x`", "`pixel_values`") == str(from_model.value)


def test_both_shells_build_the_quantizer_from_the_same_arguments():
    from groupvq_hf.shells import quantizer_arguments

    model = tiny_groupvq_model(codebook_size=64, group_sizes=[32, 32], group_ranks=[4, 8], num_groups=2)
    vae = GroupVQVAE.from_groupvq(model)
    assert set(quantizer_arguments(model.config)) == set(QUANTIZER_CONFIG_KEYS)
    assert quantizer_arguments(vae.config) == {k: (list(v) if isinstance(v, tuple) else v) for k, v in quantizer_arguments(model.config).items()}
    assert vae.quantize.group_sizes == model.quantizer.group_sizes == [32, 32]
    assert vae.quantize.group_ranks == model.quantizer.group_ranks == [4, 8]


@pytest.mark.parametrize(
    "tokens, shape, match",
    [
        (torch.zeros(1, 8, 8), None, "integer tensor"),
        (torch.zeros(1, 64, dtype=torch.long), None, r"\(batch, h, w\)"),
        (torch.zeros(1, 8, 8, dtype=torch.long), (1, 8, 4, 8), "batch\\*h\\*w = 64"),
        (torch.zeros(1, 8, 8, dtype=torch.long), (1, 8, 8, 5), "shape"),
        (torch.full((1, 8, 8), 64), None, r"\[0, 63\]"),
    ],
)
def test_bad_tokens_raise_value_error(tokens, shape, match):
    vae = tiny_vae(lookup_from_codebook=True)
    with pytest.raises(ValueError, match=match):
        vae.decode(tokens, force_not_quantize=True, shape=shape)


# --------------------------------------------------------------------------------------------- resize
@torch.no_grad()
def test_resize_extend_keeps_codes_and_round_trips(tmp_path):
    vae = tiny_vae()
    old = vae.quantize.codebook().clone()
    assert vae.resize_codebook(128, mode="extend", seed=0) == [32, 32, 32, 32]
    new = vae.quantize.codebook()
    assert new.shape == (128, 8) and vae.config.num_vq_embeddings == 128 and vae.config.group_sizes is None
    for j in range(4):  # each group keeps its 16 trained codes first, then 16 new ones
        assert torch.equal(new[32 * j : 32 * j + 16], old[16 * j : 16 * (j + 1)])
    vae.save_pretrained(tmp_path)
    loaded = GroupVQVAE.from_pretrained(tmp_path)
    assert torch.equal(loaded.quantize.codebook(), new)
    x = dummy_inputs()["sample"]
    assert torch.equal(loaded(x).sample, vae(x).sample)


@torch.no_grad()
def test_resize_per_group_list_and_resample_round_trip(tmp_path):
    vae = tiny_vae()
    assert vae.resize_codebook([8, 16, 24, 32], mode="resample", seed=1) == [8, 16, 24, 32]
    assert vae.config.num_vq_embeddings == 80 and vae.config.group_sizes == [8, 16, 24, 32]
    vae.save_pretrained(tmp_path)
    loaded = GroupVQVAE.from_pretrained(tmp_path)
    assert loaded.quantize.group_sizes == [8, 16, 24, 32]
    assert torch.equal(loaded.quantize.codebook(), vae.quantize.codebook())
    with pytest.raises(ValueError, match="new_size"):
        vae.resize_codebook(81)


# --------------------------------------------------------------------------------------------- issue 13: robustness
@torch.no_grad()
def test_bf16_load_keeps_the_quantizer_fp32_and_the_fp32_indices(tmp_path):
    vae = tiny_vae(lookup_from_codebook=True)
    vae.save_pretrained(tmp_path / "fp32")
    x = dummy_inputs()["sample"]
    reference = vae.quantize(vae.encode(x).latents)[2][2]
    half = GroupVQVAE.from_pretrained(tmp_path / "fp32", torch_dtype=torch.bfloat16).eval()
    assert half.encoder.conv_in.weight.dtype == torch.bfloat16
    assert {t.dtype for t in half.quantize.state_dict().values()} == {torch.float32}
    assert torch.equal(half.quantize.codebook(), vae.quantize.codebook())
    latents = half.encode(x.bfloat16()).latents
    # the same codes as the fp32 model gives for these (bf16) latents: the codebook is not rounded
    assert torch.equal(half.quantize(latents)[2][2], vae.quantize(latents.float())[2][2])
    assert (half.quantize(latents)[2][2] == reference).float().mean() > 0.5  # same model, bf16 encoder
    tokens = half.decode(reference, force_not_quantize=True).sample  # bf16 lookup decode
    assert tokens.dtype == torch.bfloat16 and tokens.shape == x.shape
    half.save_pretrained(tmp_path / "bf16")
    again = GroupVQVAE.from_pretrained(tmp_path / "bf16")
    assert {t.dtype for t in again.quantize.state_dict().values()} == {torch.float32}
    assert torch.equal(again.quantize.codebook(), vae.quantize.codebook())


@torch.no_grad()
def test_trained_group_sizes_survive_resize_save_and_both_conversions(tmp_path):
    vae = tiny_vae()
    assert vae.config.trained_group_sizes is None
    vae.resize_codebook(128, mode="extend", seed=0)
    assert vae.config.trained_group_sizes == [16, 16, 16, 16]
    vae.resize_codebook([40, 40, 40, 40], mode="extend", seed=1)
    assert vae.config.trained_group_sizes == [16, 16, 16, 16]  # the trained ones, not the first extension's
    vae.save_pretrained(tmp_path)
    loaded = GroupVQVAE.from_pretrained(tmp_path)
    assert loaded.config.trained_group_sizes == [16, 16, 16, 16]
    model = GroupVQModel.from_diffusers(loaded)
    assert model.config.trained_group_sizes == [16, 16, 16, 16]
    assert model.config.core_std == loaded.config.core_std
    back = GroupVQVAE.from_groupvq(model)
    assert back.config.trained_group_sizes == [16, 16, 16, 16] and back.config.core_std == vae.config.core_std
    back.resize_codebook(320, mode="resample", seed=0)
    assert back.config.trained_group_sizes == [0, 0, 0, 0]
    assert GroupVQModel.from_diffusers(back).config.trained_group_sizes == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="trained_group_sizes"):
        tiny_vae(trained_group_sizes=[16, 16, 17, 16])


@torch.no_grad()
def test_both_shells_share_one_resize_path():
    import groupvq_hf.modeling_groupvq as transformers_shell
    import groupvq_hf.shells as shells
    import groupvq_hf.vq_model as diffusers_shell

    assert transformers_shell.resize_quantizer is diffusers_shell.resize_quantizer is shells.resize_codebook
    vae, model = tiny_vae(), tiny_groupvq_model(codebook_size=64, num_groups=4, codebook_rank=4, codebook_dim=8)
    for shell in (vae, model):
        assert shell.resize_codebook([20, 20, 24, 16], mode="extend", seed=0) == [20, 20, 24, 16]
    assert vae.config.group_sizes == model.config.group_sizes == [20, 20, 24, 16]
    assert vae.config.trained_group_sizes == model.config.trained_group_sizes == [16] * 4
    assert vae.config.num_vq_embeddings == model.config.codebook_size == 80


@torch.no_grad()
def test_empty_batch_raises_value_error_naming_the_batch_size_in_both_shells():
    vae, model = tiny_vae(lookup_from_codebook=True), tiny_groupvq_model()
    empty = torch.zeros(0, 3, 16, 16)
    for call in (lambda: vae(empty), lambda: vae.encode(empty), lambda: model(empty), lambda: model.encode(empty)):
        with pytest.raises(ValueError, match="batch size 0"):
            call()
    with pytest.raises(ValueError, match="`h`.*batch size 0"):
        vae.decode(torch.zeros(0, 8, 4, 4))
    with pytest.raises(ValueError, match="`h`.*batch size 0"):
        vae.decode(torch.zeros(0, 4, 4, dtype=torch.long), force_not_quantize=True)
    with pytest.raises(ValueError, match="`quantized`.*batch size 0"):
        model.decode(torch.zeros(0, 16, 4, 4))
    with pytest.raises(ValueError, match="`indices`.*batch size 0"):
        model.decode_indices(torch.zeros(0, 4, 4, dtype=torch.long))


@torch.no_grad()
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_input_raises_value_error_naming_the_input(bad):
    vae, model = tiny_vae(), tiny_groupvq_model()
    x = dummy_inputs()["sample"][:2, :, :16, :16].clone()
    x[1, 0, 3, 5] = bad
    with pytest.raises(ValueError, match="`sample` holds NaN or inf"):
        vae(x)
    with pytest.raises(ValueError, match="`x` holds NaN or inf"):
        vae.encode(x)
    with pytest.raises(ValueError, match="`pixel_values` holds NaN or inf"):
        model(x)
    with pytest.raises(ValueError, match="`pixel_values` holds NaN or inf"):
        model.encode(x)
    latents = vae.encode(x[:1]).latents.clone()
    latents[0, 0, 0, 0] = bad
    with pytest.raises(ValueError, match="`h` holds NaN or inf"):
        vae.decode(latents)
    # one switch per model turns the check off, the shell's and the quantizer's
    for shell in (vae, model):
        assert shell.check_finite
        shell.check_finite = False
        quantizer = shell.quantize if shell is vae else shell.quantizer
        assert quantizer.check_finite is False
    assert vae(x).sample.shape == x.shape and model(x).reconstruction.shape == x.shape
