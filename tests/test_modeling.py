"""GroupVQConfig / GroupVQModel / GroupVQImageProcessor: transformers integration of the foundation."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoModel

from groupvq_hf import GroupVQConfig, GroupVQImageProcessor, GroupVQModel


def assert_same_model(a, b, pixels):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    assert torch.equal(a.quantizer.codebook(), b.quantizer.codebook())
    with torch.no_grad():
        oa, ob = a(pixels), b(pixels)
    assert torch.equal(oa.reconstruction, ob.reconstruction)
    assert torch.equal(oa.indices, ob.indices)


def test_paper_defaults():
    config = GroupVQConfig()
    assert (config.codebook_size, config.num_groups, config.codebook_rank, config.codebook_dim) == (65536, 64, 128, 128)
    assert config.sample_size == 128 and config.downsample_factor == 8 and config.latent_channels == 128
    assert config.down_block_types == ["DownEncoderBlock2D"] * 4


def test_forward_encode_decode_shapes(tiny_model, pixels):
    out = tiny_model(pixels)
    assert out.reconstruction.shape == pixels.shape
    assert out.indices.shape == (2, 8, 8) and out.indices.dtype == torch.long
    assert out.commitment_loss.ndim == 0
    enc = tiny_model.encode(pixels)
    assert enc.latents.shape == enc.quantized.shape == (2, 16, 8, 8)
    torch.testing.assert_close(tiny_model.decode(enc.quantized), out.reconstruction)
    torch.testing.assert_close(tiny_model.decode_indices(enc.indices), out.reconstruction)
    assert isinstance(tiny_model(pixels, return_dict=False), tuple)


def test_save_load_exact(tiny_model, pixels, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    loaded = GroupVQModel.from_pretrained(tmp_path).eval()
    assert_same_model(tiny_model, loaded, pixels)
    assert (tmp_path / "preprocessor_config.json").exists()
    assert (tmp_path / "image_processing_groupvq.py").exists()


@pytest.mark.parametrize(
    "new_size, mode", [(512, "extend"), (128, "resample"), (1024, "resample"), ([64, 32, 32, 32, 32, 32, 32, 32], "extend")]
)
def test_resize_then_save_load_exact(tiny_model, pixels, tmp_path, new_size, mode):
    old_codes = tiny_model.quantizer.codebook().detach().view(8, 32, 16)
    sizes = tiny_model.resize_codebook(new_size, mode=mode, seed=0)
    assert tiny_model.config.codebook_size == sum(sizes) == tiny_model.quantizer.codebook_size
    assert tiny_model.config.trained_group_sizes == ([32] * 8 if mode == "extend" else [0] * 8)
    if mode == "extend":
        new_codes = tiny_model.quantizer.codebook().detach().split(sizes)
        for j in range(8):
            torch.testing.assert_close(new_codes[j][:32], old_codes[j])
    tiny_model.save_pretrained(tmp_path)
    loaded = GroupVQModel.from_pretrained(tmp_path).eval()
    assert loaded.config.codebook_size == sum(sizes)
    assert loaded.quantizer.group_sizes == sizes
    assert loaded.config.trained_group_sizes == tiny_model.config.trained_group_sizes
    assert_same_model(tiny_model, loaded, pixels)
    assert loaded.decode_indices(torch.full((1, 4, 4), sum(sizes) - 1)).shape == (1, 3, 16, 16)


def test_auto_classes_are_registered(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), GroupVQConfig)
    assert isinstance(AutoModel.from_pretrained(tmp_path), GroupVQModel)
    assert isinstance(AutoImageProcessor.from_pretrained(tmp_path), GroupVQImageProcessor)
    config = (tmp_path / "config.json").read_text()
    assert '"AutoModel": "modeling_groupvq.GroupVQModel"' in config
    assert '"model_type": "groupvq"' in config


def test_init_weights_never_touches_cores(tiny_model):
    core = tiny_model.quantizer.core.clone()
    weight = tiny_model.quantizer.weight.detach().clone()
    tiny_model.apply(tiny_model._init_weights)
    assert torch.equal(tiny_model.quantizer.core, core)
    assert not torch.equal(tiny_model.quantizer.weight, weight)  # projectors are (re)initialised
    assert torch.count_nonzero(tiny_model.quantizer.bias) == 0


def test_init_weights_keeps_pytorch_default_conv_init(tiny_config):
    torch.manual_seed(0)
    model = GroupVQModel(tiny_config)
    conv = model.encoder.conv_in.weight
    fan_in = conv[0].numel()
    # kaiming_uniform(a=sqrt(5)) bound is 1/sqrt(fan_in); transformers' default would be N(0, 0.02).
    assert conv.abs().max() <= fan_in**-0.5 + 1e-6 and conv.std() > 0.05


def test_gradients_reach_encoder_and_projectors_not_cores(tiny_model, pixels):
    tiny_model.train()
    out = tiny_model(pixels)
    (out.reconstruction.abs().mean() + out.commitment_loss).backward()
    q = tiny_model.quantizer
    assert q.weight.grad.abs().sum() > 0 and q.bias.grad.abs().sum() > 0
    assert tiny_model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert not q.core.requires_grad and q.core.grad is None
    trainable = {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert not any("core" in n for n in trainable)


def test_gradient_checkpointing_gives_same_gradients(tiny_config, pixels):
    def grads(checkpointing):
        torch.manual_seed(0)
        model = GroupVQModel(tiny_config).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert model.encoder.gradient_checkpointing and model.decoder.gradient_checkpointing
        out = model(pixels)
        (out.reconstruction.pow(2).mean() + out.commitment_loss).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], rtol=1e-4, atol=1e-6)


def test_heterogeneous_config_round_trip(tmp_path, pixels):
    config = GroupVQConfig.from_preset("tiny", group_sizes=[128, 64, 64], group_ranks=[16, 8, 4], num_groups=3)
    torch.manual_seed(0)
    model = GroupVQModel(config).eval()
    assert model.quantizer.group_sizes == [128, 64, 64] and model.quantizer.group_ranks == [16, 8, 4]
    model.resize_codebook(512, mode="extend", seed=1)
    assert model.config.group_sizes == [256, 128, 128]
    model.save_pretrained(tmp_path)
    assert_same_model(model, GroupVQModel.from_pretrained(tmp_path).eval(), pixels)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(codebook_size=100, num_groups=8), "`codebook_size`=100 is not divisible by `num_groups`=8"),
        (dict(group_sizes=[100, 100]), r"`group_sizes` must sum to `codebook_size`=256"),
        (dict(group_sizes=[128, 128], group_ranks=[8, 8, 8]), "`group_ranks` has 3 entries but there are 2 groups"),
        (dict(projector="attention"), "`projector` must be one of"),
        (dict(trained_group_sizes=[32] * 7), "`trained_group_sizes` needs one count per group"),
        (dict(codebook_dim=0), "`codebook_dim` must be a positive int"),
        (dict(norm_num_groups=0), "`norm_num_groups` must be a positive int"),
        (dict(commitment_beta="x"), "`commitment_beta` must be a number >= 0"),
        (dict(block_out_channels=(8, 0)), "`block_out_channels` must be a non-empty list of positive ints"),
        (dict(norm_type="spatial", codebook_dim=8), "`codebook_dim` \\(8\\) must equal `latent_channels` \\(16\\)"),
        (dict(trained_group_sizes=[33] + [32] * 7), "`trained_group_sizes` needs one count per group"),
        (dict(block_out_channels=(30, 32)), "`norm_num_groups`=8 must divide"),
        (dict(down_block_types=("DownEncoderBlock2D",)), "`down_block_types` needs one entry per"),
    ],
)
def test_invalid_config_raises_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GroupVQConfig.from_preset("tiny", **kwargs)


def test_bad_inputs_raise_value_error(tiny_model):
    with pytest.raises(ValueError, match="`pixel_values` must have 3 channels"):
        tiny_model(torch.zeros(1, 4, 32, 32))
    with pytest.raises(ValueError, match="divisible by the downsampling factor 4, got 30x32"):
        tiny_model(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match="`pixel_values` must be a 4-D tensor"):
        tiny_model(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match=r"`indices` must lie in \[0, 255\]"):
        tiny_model.decode_indices(torch.full((1, 2, 2), 256))
    with pytest.raises(ValueError, match="integer tensor"):
        tiny_model.decode_indices(torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match=r"`indices` must be an integer tensor of shape \(batch, h, w\)"):
        tiny_model.decode_indices(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="does not split over the 8 groups"):
        tiny_model.resize_codebook(100)
    with pytest.raises(ValueError, match="`mode` must be one of"):
        tiny_model.resize_codebook(512, mode="double")
    with pytest.raises(ValueError, match="`quantized` must have shape"):
        tiny_model.decode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="`quantized` must be a floating-point tensor"):
        tiny_model.decode(torch.zeros(1, 16, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="`pixel_values` must be a floating-point tensor"):
        tiny_model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_image_processor_round_trip():
    processor = GroupVQImageProcessor()
    image = Image.fromarray((np.random.default_rng(0).random((100, 150, 3)) * 255).astype("uint8"))
    pixel_values = processor(image, return_tensors="pt").pixel_values
    assert pixel_values.shape == (1, 3, 128, 128)
    assert pixel_values.min() >= -1 and pixel_values.max() <= 1
    gray = processor(image.convert("L"), return_tensors="pt").pixel_values
    assert gray.shape == (1, 3, 128, 128)
    pil = processor.postprocess(pixel_values)[0]
    assert pil.size == (128, 128) and pil.mode == "RGB"
    array = processor.postprocess(pixel_values, output_type="np")
    assert array.dtype == np.uint8 and array.shape == (1, 128, 128, 3)
    # [-1, 1] -> uint8 -> [-1, 1] is lossless up to quantisation.
    back = torch.from_numpy(array).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert (back - pixel_values).abs().max() <= 1 / 127.5 + 1e-6
    with pytest.raises(ValueError, match="`output_type` must be"):
        processor.postprocess(pixel_values, output_type="jpg")
    # per-channel statistics are undone per channel
    imagenet = GroupVQImageProcessor(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    normalized = imagenet(image, return_tensors="pt").pixel_values
    unit = imagenet.postprocess(normalized, output_type="pt")
    plain = GroupVQImageProcessor().postprocess(pixel_values, output_type="pt")
    assert (unit - plain).abs().max() < 1e-5


def test_low_precision_load_keeps_quantizer_fp32(tiny_model, tmp_path, pixels):
    tiny_model.save_pretrained(tmp_path)
    model = GroupVQModel.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert model.encoder.conv_in.weight.dtype == torch.bfloat16
    assert model.quantizer.core.dtype == model.quantizer.weight.dtype == torch.float32
    assert torch.equal(model.quantizer.codebook(), tiny_model.quantizer.codebook())
    out = model(pixels.bfloat16())
    assert out.reconstruction.dtype == torch.bfloat16 and out.commitment_loss.dtype == torch.float32
    torch.testing.assert_close(model.decode_indices(out.indices), out.reconstruction)


def test_conversion_of_a_bf16_loaded_model_keeps_the_fp32_quantizer(tiny_model, tmp_path, pixels):
    from groupvq_hf import GroupVQVAE

    tiny_model.save_pretrained(tmp_path)
    model = GroupVQModel.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    vae = GroupVQVAE.from_groupvq(model)
    assert vae.quantize.core.dtype == torch.float32 and vae.encoder.conv_in.weight.dtype == torch.bfloat16
    back = GroupVQModel.from_diffusers(vae)
    assert back.quantizer.core.dtype == torch.float32 and not back.training
    assert torch.equal(back.quantizer.codebook(), tiny_model.quantizer.codebook())
    with torch.no_grad():
        assert torch.equal(back(pixels.bfloat16()).reconstruction, model(pixels.bfloat16()).reconstruction)
        assert torch.equal(vae(pixels.bfloat16()).sample, model(pixels.bfloat16()).reconstruction)


def test_diffusers_layouts_with_few_latent_channels_are_valid():
    config = GroupVQConfig(codebook_size=16, num_groups=2, codebook_dim=3, codebook_rank=3, latent_channels=3,
                           block_out_channels=(32,), norm_num_groups=32)  # diffusers VQModel's default shape
    assert GroupVQModel(config)(torch.zeros(1, 3, 8, 8)).reconstruction.shape == (1, 3, 8, 8)


def test_save_pretrained_with_push_to_hub_uploads_after_the_processor_is_written(tiny_model, tmp_path, monkeypatch):
    pushed = []
    monkeypatch.setattr(
        GroupVQModel, "push_to_hub",
        lambda self, repo_id, **kw: pushed.append((repo_id, (tmp_path / "preprocessor_config.json").exists(), kw)),
    )
    tiny_model.save_pretrained(tmp_path, push_to_hub=True, repo_id="me/tok", token="hf_x", private=True)
    assert pushed == [("me/tok", True, {"token": "hf_x", "private": True})]
