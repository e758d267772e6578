"""GroupVQVAE: the diffusers VQModel shell around GroupVectorQuantizer (issue 3)."""

import importlib.util
import inspect
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from diffusers import VQModel
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.training_utils import EMAModel

from groupvq_hf import GroupVectorQuantizer, GroupVQConfig, GroupVQModel, GroupVQVAE
from groupvq_hf.hub.conversion import checkpoint_kind, convert_checkpoint
from groupvq_hf.quantizer import QUANTIZER_CONFIG_KEYS

REPO = Path(__file__).resolve().parents[1]
# diffusers' own VQModel test configuration (tests/models/autoencoders/test_models_vq.py).
VQ_TEST_INIT = {
    "block_out_channels": [8, 16],
    "norm_num_groups": 8,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "latent_channels": 3,
}
TINY = dict(VQ_TEST_INIT, latent_channels=8, num_vq_embeddings=64, num_groups=4, codebook_rank=4)


def dummy_inputs():
    generator = torch.Generator("cpu").manual_seed(0)
    return {"sample": torch.randn(4, 3, 32, 32, generator=generator)}


def tiny_vae(seed=0, **overrides):
    torch.manual_seed(seed)
    return GroupVQVAE(**{**TINY, **overrides}).eval()


def tiny_groupvq_model(seed=0, **overrides):
    torch.manual_seed(seed)
    small = {"block_out_channels": (8, 16), "norm_num_groups": 8, "latent_channels": 8, "sample_size": 16}
    config = GroupVQConfig.from_preset("tiny", **{**small, **overrides})
    return GroupVQModel(config).eval()


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


# --------------------------------------------------------------------------------------------- conversion
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


# --------------------------------------------------------------------------------------------- remote code
def test_saved_folder_carries_code_and_loads_without_groupvq_hf(tmp_path):
    vae = tiny_vae()
    vae.save_pretrained(tmp_path / "vae")
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert config["auto_map"] == {"AutoModel": "vq_model.GroupVQVAE"}
    assert {"vq_model.py", "quantizer.py"} <= set(os.listdir(tmp_path / "vae"))
    x = dummy_inputs()["sample"][:1]
    with torch.no_grad():
        torch.save({"x": x, "sample": vae(x).sample}, tmp_path / "ref.pt")
    code = f"""
import sys
sys.modules["groupvq_hf"] = None
import torch, diffusers
model = diffusers.AutoModel.from_pretrained({str(tmp_path / 'vae')!r}, trust_remote_code=True)
ref = torch.load({str(tmp_path / 'ref.pt')!r})
with torch.no_grad():
    same = torch.equal(model(ref["x"]).sample, ref["sample"])
print(type(model).__module__, type(model).__name__, isinstance(model, diffusers.VQModel), same)
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["diffusers_modules.local.vq_model", "GroupVQVAE", "True", "True"]


def test_loading_does_not_warn_about_auto_map(tmp_path, caplog):
    tiny_vae().save_pretrained(tmp_path)
    from diffusers.utils import logging as dlogging

    dlogging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            GroupVQVAE.from_pretrained(tmp_path)
    finally:
        dlogging.disable_propagation()
    assert "auto_map" not in caplog.text


def test_push_to_hub_uploads_code(tmp_path, monkeypatch):
    """ModelMixin.push_to_hub -> save_pretrained: the uploaded folder holds the code files (Hub calls stubbed)."""
    import diffusers.utils.hub_utils as hub_utils

    uploaded = {}

    class Repo:
        repo_id = "user/groupvq-tiny"

    def fake_upload(self, working_dir, repo_id, **kwargs):
        uploaded["files"] = sorted(os.listdir(working_dir))
        uploaded["repo_id"] = repo_id

    monkeypatch.setattr(hub_utils, "create_repo", lambda *a, **k: Repo())
    monkeypatch.setattr(hub_utils, "load_or_create_model_card", lambda *a, **k: hub_utils.ModelCard("# card"))
    monkeypatch.setattr(type(tiny_vae()), "_upload_folder", fake_upload)
    tiny_vae().push_to_hub("user/groupvq-tiny")
    assert uploaded["repo_id"] == "user/groupvq-tiny"
    expected = {"config.json", "diffusion_pytorch_model.safetensors", "quantizer.py", "vq_model.py"}
    assert expected <= set(uploaded["files"])


def test_save_pretrained_keeps_modelmixin_signature():
    from diffusers import ModelMixin

    base = inspect.signature(ModelMixin.save_pretrained).parameters
    ours = inspect.signature(GroupVQVAE.save_pretrained).parameters
    assert list(ours) == list(base)


# --------------------------------------------------------------------------------------------- diffusers' generic
# The checks of diffusers' ModelTesterMixin / TrainingTesterMixin / NewAutoencoderTesterMixin that run on a CPU,
# with diffusers' own VQModel test configuration and inputs.
class TestDiffusersGenericModelChecks:
    @torch.no_grad()
    def test_from_save_pretrained(self, tmp_path):
        torch.manual_seed(0)
        model = GroupVQVAE(**VQ_TEST_INIT).eval()
        model.save_pretrained(tmp_path)
        new_model = GroupVQVAE.from_pretrained(tmp_path)
        for name, value in model.state_dict().items():
            assert new_model.state_dict()[name].shape == value.shape
        image = model(**dummy_inputs(), return_dict=False)[0]
        assert torch.allclose(image, new_model(**dummy_inputs(), return_dict=False)[0], atol=5e-5, rtol=5e-5)

    @torch.no_grad()
    def test_from_save_pretrained_variant(self, tmp_path):
        model = GroupVQVAE(**VQ_TEST_INIT).eval()
        model.save_pretrained(tmp_path, variant="fp16")
        new_model = GroupVQVAE.from_pretrained(tmp_path, variant="fp16")
        with pytest.raises(OSError, match="Error no file named diffusion_pytorch_model.bin found in directory"):
            GroupVQVAE.from_pretrained(tmp_path)
        image = model(**dummy_inputs(), return_dict=False)[0]
        assert torch.allclose(image, new_model(**dummy_inputs(), return_dict=False)[0], atol=5e-5, rtol=0)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
    def test_from_save_pretrained_dtype(self, tmp_path, dtype):
        model = GroupVQVAE(**VQ_TEST_INIT).eval().to(dtype)
        model.save_pretrained(tmp_path)
        assert GroupVQVAE.from_pretrained(tmp_path, low_cpu_mem_usage=True, torch_dtype=dtype).dtype == dtype
        # as diffusers' own check: a model with `_keep_in_fp32_modules` always loads with low_cpu_mem_usage=True
        with pytest.raises(ValueError, match="`low_cpu_mem_usage` cannot be False"):
            GroupVQVAE.from_pretrained(tmp_path, low_cpu_mem_usage=False, torch_dtype=dtype)

    @torch.no_grad()
    def test_determinism_and_output_shape(self):
        model = GroupVQVAE(**VQ_TEST_INIT).eval()
        first = model(**dummy_inputs(), return_dict=False)[0]
        second = model(**dummy_inputs(), return_dict=False)[0]
        assert torch.allclose(first, second, atol=1e-5, rtol=0)
        assert first[0].shape == (3, 32, 32)

    @torch.no_grad()
    def test_outputs_equivalence(self):
        model = GroupVQVAE(**VQ_TEST_INIT).eval()
        as_dict = model(**dummy_inputs())
        as_tuple = model(**dummy_inputs(), return_dict=False)
        assert len(as_tuple) == len(as_dict.values()) == 2
        for a, b in zip(as_tuple, as_dict.values()):
            assert torch.allclose(a, b, atol=1e-5, rtol=0)

    def test_getattr_is_correct(self):
        model = GroupVQVAE(**VQ_TEST_INIT)
        model.dummy_attribute = 5
        model.register_to_config(test_attribute=5)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert model.dummy_attribute == 5 and model.save_pretrained == getattr(model, "save_pretrained")
        with pytest.warns(FutureWarning):
            assert model.test_attribute == 5
        with pytest.raises(AttributeError) as error:
            model.does_not_exist
        assert str(error.value) == "'GroupVQVAE' object has no attribute 'does_not_exist'"

    @torch.no_grad()
    def test_sharded_checkpoints_with_parallel_loading(self, tmp_path):
        from diffusers.utils import SAFE_WEIGHTS_INDEX_NAME, constants

        torch.manual_seed(0)
        model = GroupVQVAE(**VQ_TEST_INIT).eval()
        base = model(**dummy_inputs(), return_dict=False)[0]
        size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        model.save_pretrained(tmp_path, max_shard_size=f"{int(size * 0.75 / 1024)}KB")
        index = json.loads((tmp_path / SAFE_WEIGHTS_INDEX_NAME).read_text())
        assert len(set(index["weight_map"].values())) > 1
        assert any(name.startswith("quantize.") for name in index["weight_map"])
        original = constants.HF_ENABLE_PARALLEL_LOADING
        try:
            for parallel in (False, True):
                constants.HF_ENABLE_PARALLEL_LOADING = parallel
                loaded = GroupVQVAE.from_pretrained(tmp_path).eval()
                assert torch.allclose(base, loaded(**dummy_inputs(), return_dict=False)[0], atol=1e-5, rtol=0)
        finally:
            constants.HF_ENABLE_PARALLEL_LOADING = original

    def test_training_step_with_ema(self):
        model = GroupVQVAE(**VQ_TEST_INIT).train()
        ema = EMAModel(model.parameters())
        output = model(**dummy_inputs(), return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(output, torch.randn_like(output)) + model(**dummy_inputs()).commit_loss
        loss.backward()
        ema.step(model.parameters())
        assert model.quantize.bias.grad is not None and model.encoder.conv_in.weight.grad is not None
        assert not model._supports_gradient_checkpointing  # as VQModel: the gradient-checkpointing tests skip

    @torch.no_grad()
    def test_forward_with_norm_groups(self):
        model = GroupVQVAE(**{**VQ_TEST_INIT, "norm_num_groups": 16, "block_out_channels": (16, 32)}).eval()
        output = model(**dummy_inputs()).to_tuple()[0]
        assert output.shape == dummy_inputs()["sample"].shape

    @torch.no_grad()
    def test_layerwise_casting_keeps_quantizer_in_compute_dtype(self):
        model = GroupVQVAE(**VQ_TEST_INIT).eval()
        reference = model(**dummy_inputs()).sample
        model.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
        assert model.quantize.bias.dtype == torch.float32 and model.encoder.conv_in.weight.dtype == torch.bfloat16
        output = model(**dummy_inputs()).sample
        assert output.shape == reference.shape and output.dtype == torch.float32 and output.isfinite().all()

    def test_offloading_support_flags_match_vqmodel(self):
        # diffusers' offloading tests skip a model without `_no_split_modules` / group-offload support, as VQModel.
        assert GroupVQVAE._no_split_modules == VQModel._no_split_modules
        assert GroupVQVAE._supports_group_offloading == VQModel._supports_group_offloading
        assert GroupVQVAE._skip_layerwise_casting_patterns == VQModel._skip_layerwise_casting_patterns


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


SAVER = """
import sys, torch
from groupvq_hf import GroupVQConfig, GroupVQModel, GroupVQVAE
seed, path = int(sys.argv[1]), sys.argv[2]
torch.manual_seed(seed)
small = dict(block_out_channels=(8, 16), norm_num_groups=8, latent_channels=8, sample_size=16)
model = GroupVQModel(GroupVQConfig.from_preset("tiny", codebook_size=64 * (seed + 1), **small))
vae = GroupVQVAE.from_groupvq(model)
for _ in range(3):
    model.save_pretrained(path + "/model")
    vae.save_pretrained(path + "/vae")
"""


def _read_folder(path, kind):
    """(codebook size in config.json, core rows in the weights) read through one directory handle, so both come from
    the same folder even if another one is swapped in meanwhile; None when the folder is gone or incomplete."""
    weights = "model.safetensors" if kind == "model" else "diffusion_pytorch_model.safetensors"
    try:
        folder = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        with open("config.json", "rb", opener=lambda name, flags: os.open(name, flags, dir_fd=folder)) as f:
            config = f.read()
        with open(weights, "rb", opener=lambda name, flags: os.open(name, flags, dir_fd=folder)) as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    except FileNotFoundError:
        return None
    finally:
        os.close(folder)
    try:
        size = json.loads(config)["codebook_size" if kind == "model" else "num_vq_embeddings"]
    except ValueError:  # a config.json half rewritten in place
        return ("broken config.json", config[:40])
    rows, per_group = header[f"{'quantizer' if kind == 'model' else 'quantize'}.core"]["shape"][:2]
    return size, rows * per_group


def test_two_processes_saving_one_folder_never_leave_a_mixed_folder(tmp_path):
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    procs = [subprocess.Popen([sys.executable, str(script), str(seed), str(tmp_path / "out")]) for seed in (0, 1)]
    seen = {"model": [], "vae": []}
    while any(p.poll() is None for p in procs):  # a reader meanwhile: every complete read is of one writer
        for kind, reads in seen.items():
            reads.append(_read_folder(tmp_path / "out" / kind, kind))
        time.sleep(0.002)
    assert [p.wait() for p in procs] == [0, 0]
    for kind, reads in seen.items():
        reads = [r for r in reads + [_read_folder(tmp_path / "out" / kind, kind)] if r is not None]
        assert reads[-1] in ((64, 64), (128, 128)), kind
        assert [r for r in reads if r[0] != r[1]] == [], kind  # never a config of one save beside another's weights
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model", "vae"]  # no temporary folder left


@torch.no_grad()
def test_saving_over_a_folder_keeps_other_files_and_drops_stale_weights(tmp_path, monkeypatch):
    model = tiny_groupvq_model()
    folder = tmp_path / "model"
    (folder / "extra").mkdir(parents=True)
    (folder / "README.md").write_text("my card")
    (folder / "extra" / "results.json").write_text("{}")
    (folder / "preprocessor_config.json").write_text('{"custom": true}')  # the user's processor is kept
    for stale in ("model-00001-of-00002.safetensors", "model.safetensors.index.json"):  # a sharded save's files
        (folder / stale).write_text("stale")
    model.save_pretrained(folder)
    names = sorted(p.name for p in folder.iterdir())
    assert "README.md" in names and "extra" in names and not [n for n in names if n.startswith("model-")]
    assert "model.safetensors.index.json" not in names
    assert json.loads((folder / "preprocessor_config.json").read_text()) == {"custom": True}
    assert (folder / "extra" / "results.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    loaded = GroupVQModel.from_pretrained(folder)
    assert torch.equal(loaded.quantizer.codebook(), model.quantizer.codebook())
    monkeypatch.chdir(folder)  # the working directory itself is written in place, never renamed
    tiny_vae().save_pretrained(".")
    assert (folder / "diffusion_pytorch_model.safetensors").is_file() and (folder / "README.md").is_file()
