"""The "simvq" backbone and SimVQ checkpoints: exact conversion of the `simvq-tiny` fixture (made by SimVQ's own code),
refused checkpoints, self-extension (Algorithm 2) of a converted model, save/load/remote code/publishing, training,
evaluation."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from groupvq_hf import GroupVQConfig, GroupVQModel, GroupVQVAE
from groupvq_hf.hub.simvq_conversion import from_simvq, simvq_config

REPO_ROOT = Path(__file__).resolve().parents[1]
# Made by running SimVQ's own code (see its README.md), carried in the repository unchanged.
FIXTURE = REPO_ROOT / "tests" / "fixtures" / "simvq-tiny"
CKPT, YAML = FIXTURE / "simvq-tiny.ckpt", FIXTURE / "simvq-tiny.yaml"


@pytest.fixture(scope="module", autouse=True)
def fixture_folder():
    missing = [p.name for p in (CKPT, YAML, FIXTURE / "reference_outputs.safetensors") if not p.is_file()]
    assert not missing, f"SimVQ fixture files {missing} not found in {FIXTURE}."


@pytest.fixture(scope="module")
def reference():
    return load_file(str(FIXTURE / "reference_outputs.safetensors"))


@pytest.fixture(scope="module")
def checkpoint():
    return torch.load(CKPT, map_location="cpu", weights_only=True)


def _close(actual, expected, rtol=1e-5):
    """Within `rtol` of the reference, relative to the reference's scale."""
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * float(expected.abs().max()))


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name.replace(".py", ""), REPO_ROOT / "scripts" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("weights", ["raw", "ema"])
def test_converted_checkpoint_reproduces_simvq_outputs(reference, weights):
    model = from_simvq(CKPT, YAML, ema=weights == "ema")
    config = model.config
    assert (config.backbone, config.num_groups, config.codebook_size, config.codebook_rank, config.codebook_dim) == (
        "simvq", 1, 64, 32, 32,
    )
    assert config.core_std == 32**-0.5 and config.trained_group_sizes is None
    assert isinstance(model.quant_conv, torch.nn.Identity) and isinstance(model.post_quant_conv, torch.nn.Identity)
    with torch.no_grad():
        out = model(reference["pixel_values"])
        codebook = model.quantizer.codebook()
    assert torch.equal(out.indices, reference[f"{weights}.indices"])
    _close(out.latents, reference[f"{weights}.latents"])
    _close(out.quantized, reference[f"{weights}.quantized"])
    _close(out.reconstruction, reference[f"{weights}.reconstruction"])
    _close(codebook, reference[f"{weights}.codebook"])
    _close(out.commitment_loss, reference[f"{weights}.commitment_loss"].reshape(()))
    # indices decode through the projected codebook (SimVQ's get_codebook_entry skips the projector)
    _close(model.quantizer.get_codebook_entry(out.indices, (2, 16, 16, 32)), out.quantized)


def test_ema_weights_are_the_default_and_training_modules_are_dropped(checkpoint):
    state = checkpoint["state_dict"]
    default, raw = from_simvq(CKPT, YAML), from_simvq(CKPT, YAML, ema=False)
    ema_weight = state["model_ema.decoderup1upsampleconv1weight"]
    assert torch.equal(default.decoder.up[1].upsample.conv1.weight, ema_weight)
    assert torch.equal(raw.decoder.up[1].upsample.conv1.weight, state["decoder.up.1.upsample.conv1.weight"])
    assert not torch.equal(ema_weight, state["decoder.up.1.upsample.conv1.weight"])
    # W = embedding_proj.weight transposed, b = its bias, the core is the frozen embedding (no EMA shadow)
    assert torch.equal(default.quantizer.weight[0], state["model_ema.quantizeembedding_projweight"].t())
    assert torch.equal(default.quantizer.bias[0], state["model_ema.quantizeembedding_projbias"])
    assert torch.equal(default.quantizer.core[0], state["quantize.embedding.weight"])
    assert not any(key.startswith("loss") for key in default.state_dict())


# ---------------------------------------------------------------------------------------------------- refusals
def _save(tmp_path, checkpoint, edit) -> Path:
    state = dict(checkpoint["state_dict"])
    edit(state)
    path = tmp_path / "edited.ckpt"
    torch.save({**checkpoint, "state_dict": state}, path)
    return path


@pytest.mark.parametrize(
    "edit, ema, message",
    [
        (lambda s: s.update({"encoder.extra.weight": torch.zeros(1)}), False, "encoder.extra.weight"),
        (lambda s: s.update({"quantize.codebook_count": torch.zeros(1)}), False, "quantize.codebook_count"),
        (lambda s: s.update({"model_ema.encoderextraweight": torch.zeros(1)}), None, "model_ema.encoderextraweight"),
        (lambda s: s.pop("decoder.conv_out.bias"), False, "decoder.conv_out.bias"),
        (lambda s: s.pop("quantize.embedding_proj.bias"), False, "quantize.embedding_proj.bias"),
        (lambda s: s.pop("model_ema.encoderconv_inweight"), True, "model_ema.encoderconv_inweight"),
        (lambda s: s.update({"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3)}), False, "encoder.conv_in.weight"),
    ],
    ids=["unknown", "unknown-quantizer", "unknown-shadow", "missing", "missing-quantizer", "missing-shadow", "shape"],
)
def test_unknown_missing_or_misshapen_keys_fail_naming_the_key(tmp_path, checkpoint, edit, ema, message):
    path = _save(tmp_path, checkpoint, edit)
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        from_simvq(path, YAML, ema=ema)


def test_raw_weights_convert_without_ema_shadows(tmp_path, checkpoint, reference):
    path = _save(tmp_path, checkpoint, lambda s: [s.pop(k) for k in list(s) if k.startswith("model_ema.")])
    with pytest.raises(ValueError, match="no EMA weights"):
        from_simvq(path, YAML, ema=True)
    with torch.no_grad():
        indices = from_simvq(path, YAML).encode(reference["pixel_values"]).indices  # default: the raw weights
    assert torch.equal(indices, reference["raw.indices"])


class NotATensor:
    """A custom class: unpickling it would run arbitrary code paths, so the loader must refuse it."""

    value = 3


def test_checkpoint_with_a_pickled_object_is_refused(tmp_path, checkpoint):
    path = tmp_path / "pickled.ckpt"
    torch.save({**checkpoint, "hyper_parameters": NotATensor()}, path)
    with pytest.raises(ValueError, match="weights_only=True"):
        from_simvq(path, YAML)


def test_config_refusals(tmp_path):
    import yaml

    config = yaml.safe_load(YAML.read_text())
    params = config["model"]["init_args"]["quantconfig"]["params"]
    assert simvq_config(config).sample_size == 32
    with pytest.raises(ValueError, match="legacy"):
        simvq_config({**config, "model": {"init_args": {**config["model"]["init_args"], "quantconfig": {
            "target": "taming.modules.vqvae.quantize.SimVQ", "params": {**params, "legacy": True}}}}})
    with pytest.raises(ValueError, match="quantconfig.target"):
        simvq_config({"model": {"init_args": {**config["model"]["init_args"], "quantconfig": {
            "target": "taming.modules.vqvae.quantize.VectorQuantizer2", "params": params}}}})
    with pytest.raises(ValueError, match="ddconfig"):
        simvq_config({"model": {"init_args": {}}})
    with pytest.raises(ValueError, match="latent_channels"):
        GroupVQConfig.from_preset("simvq-tiny", codebook_dim=16)


def test_groupvqvae_refuses_the_simvq_backbone():
    model = GroupVQModel(GroupVQConfig.from_preset("simvq-tiny"))
    with pytest.raises(ValueError, match="backbone='simvq'"):
        GroupVQVAE.from_groupvq(model)


# ---------------------------------------------------------------------------------------------------- Algorithm 2
def test_self_extension_keeps_trained_codes_and_draws_new_ones_from_n_0_1_over_d(reference):
    model = from_simvq(CKPT, YAML)
    with torch.no_grad():
        old_core, old_codebook = model.quantizer.core.clone(), model.quantizer.codebook()
        old_indices = model.encode(reference["pixel_values"]).indices
        sizes = model.resize_codebook(128, mode="extend", seed=0)
        core, codebook = model.quantizer.core, model.quantizer.codebook()
    assert sizes == [128] and model.config.codebook_size == 128 and model.config.trained_group_sizes == [64]
    assert torch.equal(core[0, :64], old_core[0])  # the 64 trained codes' cores, bit for bit
    assert torch.equal(codebook[:64], old_codebook)  # and the codes themselves
    fresh = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)) * 32**-0.5  # N(0, 1/d)
    assert torch.equal(core[0, 64:], fresh)
    projector = model.quantizer.weight[0].detach(), model.quantizer.bias[0].detach()
    _close(codebook[64:], fresh @ projector[0] + projector[1])  # through the trained projector
    with torch.no_grad():
        new_indices = model.encode(reference["pixel_values"]).indices
    kept = new_indices < 64  # a token either keeps its code or moves to a strictly nearer new one
    assert torch.equal(new_indices[kept], old_indices[kept])


# ---------------------------------------------------------------------------------------------------- save / load / Hub
LOADER = Path(__file__).resolve().parent / "drivers" / "load_simvq_remote_code.py"


def _load_without_package(source, pixels, tmp_path, env) -> dict:
    torch.save(pixels, tmp_path / "pixels.pt")
    result = subprocess.run(
        [sys.executable, str(LOADER), str(source), str(tmp_path / "pixels.pt"), str(tmp_path / "out.pt")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(tmp_path / "out.pt")


def test_cli_conversion_saves_a_model_that_loads_back(tmp_path, reference, capsys):
    """Into a folder that held another model (a training export of the diffusers class, with its discriminator and
    run arguments): that model's files are not carried over, others (a README) are."""
    stale = tmp_path / "model"
    stale.mkdir()
    for name in ("diffusion_pytorch_model.safetensors", "discriminator.safetensors", "run_args.json", "README.md"):
        (stale / name).write_text("of the model this folder held")
    _script("convert_checkpoint.py").main(
        ["--from_simvq", str(CKPT), "--config", str(YAML), str(tmp_path / "model"), "--no_ema"]
    )
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ema"] is False
    assert (tmp_path / "model" / "simvq_backbone.py").is_file()
    assert sorted(p.name for p in stale.iterdir() if p.read_bytes() == b"of the model this folder held") == ["README.md"]
    assert not (stale / "discriminator.safetensors").exists() and not (stale / "run_args.json").exists()
    pixels = reference["pixel_values"]
    model = GroupVQModel.from_pretrained(tmp_path / "model").eval()
    assert model.config.core_std == 32**-0.5
    with torch.no_grad():
        local = model(pixels)
    assert torch.equal(local.indices, reference["raw.indices"])
    _close(local.reconstruction, reference["raw.reconstruction"])
    # (loading it as remote code without groupvq_hf: the Hub test below, which loads the published folder)


def test_self_extended_model_publishes_and_loads_from_the_hub_without_the_package(tmp_path, reference):
    from hub_server import HubServer, HubUser

    from_simvq(CKPT, YAML).save_pretrained(tmp_path / "model")
    with HubServer(tokens={"hf_writer": HubUser("tester")}) as hub:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf"),
            "HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_writer", "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "NO_PROXY": "127.0.0.1,localhost",
        }
        push = [sys.executable, str(REPO_ROOT / "scripts" / "push_to_hub.py"), "--model", str(tmp_path / "model"),
                "--repo_id", "tester/simvq-tiny", "--codebook_size", "128", "--resize_mode", "extend"]
        result = subprocess.run(push, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        remote = _load_without_package("tester/simvq-tiny", reference["pixel_values"], tmp_path, env)
    local = from_simvq(CKPT, YAML)
    local.resize_codebook(128, mode="extend", seed=0)  # what push_to_hub.py did (--resize_seed 0)
    with torch.no_grad():
        out = local(reference["pixel_values"])
        decoded = local.decode_indices(out.indices)
    assert torch.equal(remote["decoded"], decoded)
    assert remote["config"]["backbone"] == "simvq" and remote["config"]["core_std"] == 32**-0.5
    assert remote["config"]["codebook_size"] == 128 and remote["config"]["trained_group_sizes"] == [64]
    assert torch.equal(remote["codebook"], local.quantizer.codebook().detach())
    assert torch.equal(remote["indices"], out.indices)
    assert torch.equal(remote["reconstruction"], out.reconstruction)


# ---------------------------------------------------------------------------------------------------- train / evaluate
def test_a_few_training_steps_of_the_tiny_simvq_preset_on_the_demo_photos(tmp_path, fresh_accelerate_state):
    from groupvq_hf.training import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = main([
            "--dataset", "demo", "--model_config", "simvq-tiny", "--resolution", "32", "--max_train_steps", "2",
            "--train_batch_size", "2", "--perceptual_weight", "0", "--report_to", "none",
            "--dataloader_num_workers", "0", "--num_validation_images", "2", "--seed", "0",
            "--output_dir", str(tmp_path),
        ])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
        fresh_accelerate_state()
    assert result["global_step"] == 2
    model = GroupVQModel.from_pretrained(tmp_path / "model")
    assert model.config.backbone == "simvq" and isinstance(model.quant_conv, torch.nn.Identity)
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 32, 32))
    assert out.reconstruction.shape == (1, 3, 32, 32) and out.indices.shape == (1, 16, 16)


def test_evaluation_and_resize_study_run_on_the_simvq_backbone(reference):
    from groupvq_hf.evaluation.evaluator import resize_study

    model = from_simvq(CKPT, YAML)
    pixels = reference["pixel_values"]
    rows = resize_study(
        copy.deepcopy(model), lambda: [pixels], plan=[
            {"method": "trained", "mode": None, "power": 0, "codebook_size": 64},
            {"method": "self-extension", "mode": "extend", "power": 1, "codebook_size": 128},
        ], metrics="psnr,codebook_usage", progress=False,
    )  # fmt: skip
    assert [row["codebook_size"] for row in rows] == [64, 128]
    with torch.no_grad():
        reconstruction = model(pixels).reconstruction.clamp(-1, 1)
    mse = ((reconstruction - pixels) / 2).pow(2).mean(dim=(1, 2, 3))  # per image, on [0, 1]
    assert rows[0]["psnr"] == pytest.approx(float((-10 * torch.log10(mse)).mean()), rel=1e-4)
    assert rows[0]["codebook_usage"] == pytest.approx(len(model(pixels).indices.unique()) / 64)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = GroupVQModel(GroupVQConfig.from_preset("simvq-tiny")).train()
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1

    def grads():
        model.zero_grad()
        out = model(pixels)
        (out.reconstruction.square().mean() + out.commitment_loss).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    plain = grads()
    model.gradient_checkpointing_enable()
    assert model.encoder.gradient_checkpointing and model.decoder.gradient_checkpointing
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)
