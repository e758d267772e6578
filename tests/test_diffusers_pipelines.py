"""GroupVQVAE inside diffusers pipelines, built offline from tiny randomly initialised components (issue 3).

Each pipeline runs end to end; the calls it makes to the GroupVQVAE are recorded, and its image is checked against
a decoding of the latents or tokens it handed over (through the quantizer, or straight through the codebook).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import (
    AmusedImg2ImgPipeline,
    AmusedPipeline,
    AmusedScheduler,
    DDIMScheduler,
    DiffusionPipeline,
    KandinskyV22Pipeline,
    LDMPipeline,
    LDMSuperResolutionPipeline,
    Transformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
    UVit2DModel,
    VQDiffusionPipeline,
    VQDiffusionScheduler,
)
from diffusers.pipelines.deprecated.vq_diffusion.pipeline_vq_diffusion import LearnedClassifierFreeSamplingEmbeddings
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from groupvq_hf import GroupVQVAE
from groupvq_hf.hub.conversion import LIBRARY_ENTRY, REMOTE_CODE_ENTRY, copy_pipeline, set_pipeline_component_source


def tiny_vae(seed=0, **overrides):
    torch.manual_seed(seed)
    config = dict(
        block_out_channels=[8, 8], down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        layers_per_block=1, norm_num_groups=4, latent_channels=4, num_vq_embeddings=16, num_groups=4, codebook_rank=2,
        mid_block_add_attention=False, sample_size=16,
    )
    return GroupVQVAE(**{**config, **overrides}).eval()


def record_decode(vae):
    """Wrap `vae.decode` on the instance so every call the pipeline makes is kept: (args, kwargs, output)."""
    calls, original = [], vae.decode

    def decode(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append((args, kwargs, out))
        return out

    vae.decode = decode
    return calls


def to_numpy_image(sample, signed=True):
    image = (sample / 2 + 0.5).clamp(0, 1) if signed else sample.clip(0, 1)
    return image.permute(0, 2, 3, 1).float().numpy()


def tiny_clip(seed=0, hidden=8, projection=False):
    """A CLIP tokenizer over the 256 byte symbols (no merges) and a 1-layer CLIP text model: no download."""
    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": i + 256 for i, s in enumerate(symbols)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=hidden, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
        max_position_embeddings=16, bos_token_id=512, eos_token_id=513, pad_token_id=513, projection_dim=hidden,
    )
    model = CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)
    return tokenizer, model.eval()


def ldm_pipeline():
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    )
    return LDMPipeline(vqvae=tiny_vae(), unet=unet, scheduler=DDIMScheduler())


# --------------------------------------------------------------------------------------------- pipelines
@torch.no_grad()
def test_ldm_pipeline_decodes_through_group_vq():
    pipe = ldm_pipeline()
    calls = record_decode(pipe.vqvae)
    image = pipe(batch_size=2, num_inference_steps=2, generator=torch.manual_seed(0), output_type="np").images
    assert image.shape == (2, 16, 16, 3)
    (latents,), kwargs, out = calls[0]
    assert kwargs == {} and latents.shape == (2, 4, 8, 8)
    assert out.commit_loss > 0  # the latents went through the Group-VQ quantizer
    quantized = pipe.vqvae.quantize(latents)[0]
    expected = pipe.vqvae.decode(quantized, force_not_quantize=True).sample
    np.testing.assert_allclose(image, to_numpy_image(expected), atol=1e-5)


@torch.no_grad()
def test_ldm_super_resolution_pipeline():
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8, in_channels=6, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    )
    # The pipeline concatenates latents and the RGB image, with `unet.in_channels // 2` latent channels: 3.
    pipe = LDMSuperResolutionPipeline(vqvae=tiny_vae(latent_channels=3), unet=unet, scheduler=DDIMScheduler())
    calls = record_decode(pipe.vqvae)
    low_res = torch.rand(1, 3, 8, 8, generator=torch.manual_seed(1)) * 2 - 1
    image = pipe(image=low_res, num_inference_steps=2, generator=torch.manual_seed(0), output_type="np").images
    assert image.shape == (1, 16, 16, 3)
    (latents,), _, _ = calls[0]
    expected = pipe.vqvae.decode(pipe.vqvae.quantize(latents)[0], force_not_quantize=True).sample
    np.testing.assert_allclose(image, to_numpy_image(expected), atol=1e-5)


@torch.no_grad()
def test_kandinsky22_decoder_uses_group_vq_as_movq():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        in_channels=4, out_channels=8, addition_embed_type="image",
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        block_out_channels=(8, 16), layers_per_block=1, encoder_hid_dim=8, encoder_hid_dim_type="image_proj",
        cross_attention_dim=8, attention_head_dim=4, resnet_time_scale_shift="scale_shift", class_embed_type=None,
        norm_num_groups=4,
    )
    # Kandinsky's MoVQ: spatial normalisation in the decoder, attention blocks, separate vq_embed_dim.
    # (diffusers' SpatialNorm uses 32 GroupNorm groups, hence 32 channels.)
    movq = tiny_vae(
        norm_type="spatial", vq_embed_dim=4, block_out_channels=[32, 32],
        down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
        up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"],
    )
    pipe = KandinskyV22Pipeline(unet=unet, scheduler=DDIMScheduler(), movq=movq)
    calls = record_decode(pipe.movq)
    embeds = torch.randn(1, 8, generator=torch.manual_seed(2))
    image = pipe(image_embeds=embeds, negative_image_embeds=-embeds, height=16, width=16, num_inference_steps=2,
                 guidance_scale=4.0, generator=torch.manual_seed(0), output_type="np").images
    assert image.shape == (1, 16, 16, 3)
    (latents,), kwargs, out = calls[0]
    assert kwargs == {"force_not_quantize": True} and torch.equal(out.commit_loss, torch.zeros(1))
    expected = pipe.movq.decode(latents, force_not_quantize=True).sample
    np.testing.assert_allclose(image, to_numpy_image(expected), atol=1e-5)


def amused_components(vae_overrides=None):
    torch.manual_seed(0)
    transformer = UVit2DModel(
        hidden_size=8, use_bias=False, hidden_dropout=0.0, cond_embed_dim=8, micro_cond_encode_dim=2,
        micro_cond_embed_dim=10, encoder_hidden_size=8, vocab_size=17, codebook_size=16, in_channels=8,
        block_out_channels=8, num_res_blocks=1, downsample=True, upsample=True, block_num_heads=1,
        num_hidden_layers=1, num_attention_heads=1, attention_dropout=0.0, intermediate_size=8, layer_norm_eps=1e-6,
        ln_elementwise_affine=True, sample_size=4,
    )
    tokenizer, text_encoder = tiny_clip(projection=True)
    vqvae = tiny_vae(lookup_from_codebook=True, **(vae_overrides or {}))
    return dict(vqvae=vqvae, tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer,
                scheduler=AmusedScheduler(mask_token_id=16))


@torch.no_grad()
def test_amused_decodes_tokens_through_lookup_from_codebook():
    pipe = AmusedPipeline(**amused_components())
    calls = record_decode(pipe.vqvae)
    image = pipe("a squirrel", height=8, width=8, num_inference_steps=2, generator=torch.manual_seed(0),
                 output_type="np").images
    assert image.shape == (1, 8, 8, 3)
    (tokens,), kwargs, _ = calls[0]
    assert kwargs["force_not_quantize"] is True and kwargs["shape"] == (1, 4, 4, 4)
    assert tokens.shape == (1, 4, 4) and not tokens.is_floating_point() and int(tokens.max()) < 16
    codes = pipe.vqvae.quantize.codebook()[tokens].permute(0, 3, 1, 2)  # (1, d, 4, 4) codebook rows
    expected = pipe.vqvae.decoder(pipe.vqvae.post_quant_conv(codes))
    np.testing.assert_allclose(image, to_numpy_image(expected, signed=False), atol=1e-5)


@torch.no_grad()
def test_amused_img2img_tokenizes_images_with_group_vq():
    pipe = AmusedImg2ImgPipeline(**amused_components())
    seen, quantize_forward = [], pipe.vqvae.quantize.forward
    pipe.vqvae.quantize.forward = lambda z: seen.append(quantize_forward(z)) or seen[-1]
    calls = record_decode(pipe.vqvae)
    image = torch.rand(1, 3, 8, 8, generator=torch.manual_seed(3))
    out = pipe("a squirrel", image=image, strength=0.5, num_inference_steps=2, generator=torch.manual_seed(0),
               output_type="np").images
    assert out.shape == (1, 8, 8, 3) and np.isfinite(out).all()
    # The pipeline tokenised the image as `quantize(encode(image).latents)[2][2]`: Group-VQ code indices.
    latents = pipe.vqvae.encode(pipe.image_processor.preprocess(image, height=8, width=8)).latents
    expected = pipe.vqvae.quantize.quantize_tokens(latents.permute(0, 2, 3, 1).reshape(-1, 4))[2].view(1, 4, 4)
    assert torch.equal(seen[0][2][2], expected)
    (tokens,), kwargs, _ = calls[0]
    assert tokens.shape == (1, 4, 4) and kwargs["shape"] == (1, 4, 4, 4) and int(tokens.max()) < 16
    codes = pipe.vqvae.quantize.codebook()[tokens].permute(0, 3, 1, 2)
    expected_image = pipe.vqvae.decoder(pipe.vqvae.post_quant_conv(codes))
    np.testing.assert_allclose(out, to_numpy_image(expected_image, signed=False), atol=1e-5)


@torch.no_grad()
def test_vq_diffusion_pipeline_uses_get_codebook_entry():
    tokenizer, text_encoder = tiny_clip(hidden=32)
    torch.manual_seed(0)
    transformer = Transformer2DModel(
        attention_bias=True, cross_attention_dim=32, attention_head_dim=16, num_attention_heads=1,
        num_vector_embeds=17, num_embeds_ada_norm=4, norm_num_groups=32, sample_size=4,
        activation_fn="geglu-approximate",
    )
    vqvae = tiny_vae(vq_embed_dim=4)  # VQ-Diffusion reads config.vq_embed_dim
    pipe = VQDiffusionPipeline(
        vqvae=vqvae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
        scheduler=VQDiffusionScheduler(17, num_train_timesteps=4),
        learned_classifier_free_sampling_embeddings=LearnedClassifierFreeSamplingEmbeddings(learnable=False),
    )
    calls = record_decode(pipe.vqvae)
    image = pipe("a teddy bear", num_inference_steps=2, generator=torch.manual_seed(0), output_type="np").images
    assert image.shape == (1, 8, 8, 3)
    (embeddings,), kwargs, _ = calls[0]
    assert kwargs == {"force_not_quantize": True} and embeddings.shape == (1, 4, 4, 4)
    # The embeddings the pipeline decoded are codebook rows (get_codebook_entry of its final tokens).
    flat = embeddings.permute(0, 2, 3, 1).reshape(-1, 4)
    distances = torch.cdist(flat, pipe.vqvae.quantize.codebook())
    assert distances.min(1).values.max() < 1e-5


# --------------------------------------------------------------------------------------------- save / load
@torch.no_grad()
def test_pipeline_round_trip_with_groupvq_hf_imported(tmp_path, monkeypatch):
    pipe = ldm_pipeline()
    ref = pipe(num_inference_steps=2, generator=torch.manual_seed(0), output_type="np").images
    pipe.save_pretrained(tmp_path, safe_serialization=True, variant="fp16")  # passed through to our save_pretrained
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["vqvae"] == LIBRARY_ENTRY
    saved = set(os.listdir(tmp_path / "vqvae"))
    assert {"vq_model.py", "quantizer.py", "diffusion_pytorch_model.fp16.safetensors"} <= saved
    loaded = DiffusionPipeline.from_pretrained(tmp_path, variant="fp16")
    assert type(loaded.vqvae) is GroupVQVAE and isinstance(loaded, LDMPipeline)
    out = loaded(num_inference_steps=2, generator=torch.manual_seed(0), output_type="np").images
    np.testing.assert_array_equal(out, ref)
    # diffusers never imports a module a repository names: without groupvq_hf.vq_model imported it says so.
    monkeypatch.delitem(sys.modules, "groupvq_hf.vq_model")
    with pytest.raises(ValueError, match="import groupvq_hf.vq_model before calling `from_pretrained`"):
        DiffusionPipeline.from_pretrained(tmp_path, variant="fp16")


@torch.no_grad()
def test_pipeline_custom_component_loads_without_groupvq_hf(tmp_path):
    pipe = ldm_pipeline()
    ref = pipe(num_inference_steps=2, generator=torch.manual_seed(0), output_type="np").images
    pipe.save_pretrained(tmp_path / "lib")
    assert copy_pipeline(tmp_path / "lib", tmp_path / "remote", remote_code=True) == ["vqvae"]
    assert json.loads((tmp_path / "remote" / "model_index.json").read_text())["vqvae"] == REMOTE_CODE_ENTRY
    assert {"vq_model.py", "quantizer.py"} <= set(os.listdir(tmp_path / "remote" / "vqvae"))
    np.save(tmp_path / "ref.npy", ref)
    driver = os.path.join(os.path.dirname(os.path.abspath(__file__)), "drivers", "pipeline_remote_code.py")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, driver, str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["LDMPipeline", "diffusers_modules.local.vq_model", "True"]
    # A pipeline saved from the remote-code process records the dynamic module; switching back to library form
    # makes it load from the installed package again.
    assert set_pipeline_component_source(tmp_path / "resaved", remote_code=False) == ["vqvae"]
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "resaved")
    assert type(loaded.vqvae) is GroupVQVAE
    out = loaded(num_inference_steps=2, generator=torch.manual_seed(0), output_type="np").images
    np.testing.assert_array_equal(out, ref)


def test_set_pipeline_component_source_rejects_bad_folders(tmp_path):
    with pytest.raises(ValueError, match="model_index.json"):
        set_pipeline_component_source(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"vqvae": LIBRARY_ENTRY}))
    (tmp_path / "vqvae").mkdir()
    with pytest.raises(ValueError, match="lacks"):
        set_pipeline_component_source(tmp_path, remote_code=True)
