"""ViT-VQGAN backbone (`backbone="vit"`) and the factorised, l2-normalised code lookup."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from groupvq_hf import PRESETS, GroupVQConfig, GroupVQModel
from groupvq_hf.vit import L2NormalizedGroupVectorQuantizer, ViTDecoder, ViTEncoder

# 32x32 images, patch 8 -> a 4x4 token grid; width 32, one block, two heads.
VIT = dict(
    backbone="vit", patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2.0,
    sample_size=32,
)


def vit_config(**overrides):
    return GroupVQConfig.from_preset("tiny", **{**VIT, **overrides})


def vit_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return GroupVQModel(vit_config(**overrides)).eval()


def assert_same_outputs(a, b, pixels):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    with torch.no_grad():
        oa, ob = a(pixels), b(pixels)
    assert torch.equal(oa.reconstruction, ob.reconstruction)
    assert torch.equal(oa.indices, ob.indices)


def test_config_backbone_presets_and_downsample_factor():
    assert GroupVQConfig().backbone == "vqgan"  # the default stays the convolutional VQGAN
    config = vit_config()
    assert config.downsample_factor == 8 and config.backbone == "vit"
    assert GroupVQConfig.from_preset("tiny", backbone="vit", patch_size=4).downsample_factor == 4
    paper = GroupVQConfig.from_preset("vit-imagenet")
    assert (paper.backbone, paper.codebook_size, paper.num_groups, paper.sample_size) == ("vit", 8192, 8, 128)
    assert paper.sample_size // paper.downsample_factor == 16  # 16x16 tokens, as the VQGAN setting
    assert GroupVQConfig.from_preset("vit-imagenet-16").num_groups == 16
    assert PRESETS["vit-tiny"]["backbone"] == "vit"
    # Round trip through JSON keeps every ViT setting.
    again = GroupVQConfig.from_dict(config.to_dict())
    for key in ("backbone", "patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "mlp_ratio"):
        assert getattr(again, key) == getattr(config, key), key


def test_vqgan_backbone_state_dict_matches_diffusers_vqmodel(tiny_config):
    from diffusers import VQModel

    model = GroupVQModel(tiny_config)
    assert type(model.encoder).__name__ == "Encoder" and type(model.quantizer).__name__ == "GroupVectorQuantizer"
    vae = VQModel(
        in_channels=3, out_channels=3, down_block_types=tuple(tiny_config.down_block_types),
        up_block_types=tuple(tiny_config.up_block_types), block_out_channels=tuple(tiny_config.block_out_channels),
        layers_per_block=1, latent_channels=16, norm_num_groups=8, vq_embed_dim=16, mid_block_add_attention=False,
    )
    ours = {k for k in model.state_dict() if not k.startswith("quantizer.")}
    theirs = {k for k in vae.state_dict() if not k.startswith("quantize.")}
    assert ours == theirs


def test_shapes_and_decode_paths(pixels):
    model = vit_model()
    assert isinstance(model.encoder, ViTEncoder) and isinstance(model.decoder, ViTDecoder)
    out = model(pixels)
    assert out.reconstruction.shape == pixels.shape
    assert out.indices.shape == (2, 4, 4) and out.indices.dtype == torch.long
    assert out.latents.shape == out.quantized.shape == (2, 16, 4, 4)
    assert out.commitment_loss.ndim == 0
    with torch.no_grad():
        torch.testing.assert_close(model.decode(out.quantized), out.reconstruction)
        torch.testing.assert_close(model.decode_indices(out.indices), out.reconstruction)


def test_other_sizes_interpolate_position_embeddings(pixels):
    model = vit_model()
    native = model.encoder.position_embeddings(4, 4)
    assert native is model.encoder.position_embedding  # the trained grid is used as stored
    assert model.encoder.position_embeddings(6, 8).shape == (1, 48, 32)
    with torch.no_grad():
        out = model(torch.rand(1, 3, 48, 64) * 2 - 1)
    assert out.reconstruction.shape == (1, 3, 48, 64) and out.indices.shape == (1, 6, 8)


def test_save_load_exact(tmp_path, pixels):
    model = vit_model()
    model.save_pretrained(tmp_path)
    loaded = GroupVQModel.from_pretrained(tmp_path).eval()
    assert loaded.config.backbone == "vit" and isinstance(loaded.encoder, ViTEncoder)
    assert_same_outputs(model, loaded, pixels)
    assert (tmp_path / "vit.py").exists()  # remote code travels with its relative imports


@pytest.mark.parametrize("new_size, mode", [(512, "extend"), (128, "resample")])
def test_resize_then_save_load_exact(tmp_path, pixels, new_size, mode):
    model = vit_model()
    sizes = model.resize_codebook(new_size, mode=mode, seed=0)
    assert model.config.codebook_size == sum(sizes) == new_size
    model.save_pretrained(tmp_path)
    loaded = GroupVQModel.from_pretrained(tmp_path).eval()
    assert loaded.quantizer.group_sizes == sizes
    assert_same_outputs(model, loaded, pixels)


LOADER = Path(__file__).resolve().parent / "drivers" / "load_vit_remote_code.py"


def test_remote_code_load_without_package(tmp_path, pixels):
    model = vit_model(l2_normalize_codes=True, codebook_dim=8)
    model.save_pretrained(tmp_path / "model")
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
    assert remote["quantizer"] == "L2NormalizedGroupVectorQuantizer"
    assert torch.equal(remote["reconstruction"], local.reconstruction)
    assert torch.equal(remote["indices"], local.indices)


def smooth_batch():
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    return torch.stack([torch.stack([torch.sin(3 * xx + k), torch.cos(2 * yy - k), xx * yy]) for k in range(2)])


@pytest.mark.parametrize("l2", [False, True])
def test_training_steps_reduce_loss(l2):
    pixels = smooth_batch()  # a fixed, learnable tiny batch
    model = vit_model(l2_normalize_codes=l2).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    def step():
        out = model(pixels)
        loss = F.l1_loss(out.reconstruction, pixels) + out.commitment_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    losses = [step() for _ in range(15)]
    assert losses[-1] < 0.8 * losses[0], losses
    assert not model.quantizer.core.requires_grad


def test_gradient_checkpointing_gives_same_gradients(pixels):
    def grads(checkpointing):
        model = vit_model(num_hidden_layers=2).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert model.encoder.gradient_checkpointing and model.decoder.gradient_checkpointing
        out = model(pixels)
        (out.reconstruction.pow(2).mean() + out.commitment_loss).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and "encoder.layers.1.linear1.weight" in plain
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], rtol=1e-4, atol=1e-6)


def test_init_weights_reinitialises_vit_blocks_not_cores():
    model = vit_model()
    core = model.quantizer.core.clone()
    position = model.encoder.position_embedding.detach().clone()
    model.apply(model._init_weights)
    assert torch.equal(model.quantizer.core, core)
    assert not torch.equal(model.encoder.position_embedding, position)
    assert model.encoder.position_embedding.std() < 0.05  # truncated N(0, 0.02), as ViT


def test_l2_normalized_lookup_is_cosine_search(pixels):
    model = vit_model(l2_normalize_codes=True, codebook_dim=8)  # latent 16 -> lookup space 8 (quant_conv)
    assert isinstance(model.quantizer, L2NormalizedGroupVectorQuantizer)
    codebook = model.quantizer.codebook()
    torch.testing.assert_close(codebook.norm(dim=1), torch.ones(256))
    with torch.no_grad():
        enc = model.encode(pixels)
    tokens = enc.latents.permute(0, 2, 3, 1).reshape(-1, 8)
    expected = (F.normalize(tokens, dim=1) @ F.normalize(codebook, dim=1).t()).argmax(1)
    assert torch.equal(enc.indices.flatten(), expected)
    torch.testing.assert_close(enc.quantized.norm(dim=1), torch.ones(2, 4, 4))
    with torch.no_grad():
        torch.testing.assert_close(model.decode_indices(enc.indices), model.decode(enc.quantized))


def test_l2_normalized_lookup_with_vqgan_backbone(tiny_config, pixels, tmp_path):
    # VQGAN-FC: the convolutional backbone with the factorised lookup.
    torch.manual_seed(0)
    model = GroupVQModel(GroupVQConfig.from_preset("tiny", l2_normalize_codes=True, codebook_dim=8)).eval()
    assert isinstance(model.quantizer, L2NormalizedGroupVectorQuantizer)
    model.save_pretrained(tmp_path)
    loaded = GroupVQModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded.quantizer, L2NormalizedGroupVectorQuantizer)
    assert_same_outputs(model, loaded, pixels)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(backbone="swin"), "backbone"),
        (dict(num_attention_heads=3), "num_attention_heads"),
        (dict(sample_size=36), "patch_size"),
        (dict(patch_size=0), "patch_size"),
        (dict(mlp_ratio=0), "mlp_ratio"),
        (dict(norm_type="spatial"), "norm_type"),
    ],
)
def test_invalid_vit_config_raises_value_error(overrides, match):
    with pytest.raises(ValueError, match=match):
        vit_config(**overrides)


def test_bad_inputs_raise_value_error():
    model = vit_model()
    with pytest.raises(ValueError, match="divisible"):
        model(torch.zeros(1, 3, 36, 36))
    with pytest.raises(ValueError, match="channels"):
        model(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="latent_embeds"):
        model.decoder(torch.zeros(1, 16, 4, 4), torch.zeros(1, 16, 4, 4))
