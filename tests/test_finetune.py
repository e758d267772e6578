"""Fine-tuning from trained weights (scripts/train.py --init_from): step 0 equals the loaded model, --trainable freezes
bit for bit, resize-then-train, the discriminator's round trip (export, push_to_hub --include_discriminator, Hub
--init_from, SimVQ --keep_discriminator) and every refused input. Tiny models, 32 px, CPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import train_in_process
from hub_server import HubServer, HubUser
from safetensors.torch import load_file
from test_training import TINY_RUN

from groupvq_hf import GroupVQConfig, GroupVQModel, GroupVQVAE
from groupvq_hf.training import DISCRIMINATOR_FILE, freeze_parts, load_discriminator, parse_args
from groupvq_hf.training.losses import PatchGANDiscriminator

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURE = REPO_ROOT / "tests" / "fixtures" / "simvq-tiny"
RUN = [a for i, a in enumerate(TINY_RUN) if "--model_config" not in TINY_RUN[max(0, i - 1) : i + 1]]  # no preset
FROZEN_LR = ["--learning_rate", "0", "--quantizer_learning_rate", "0"]
DISC = ["--disc_channels", "8", "--disc_layers", "2"]


def _train(output_dir: Path, *extra: str) -> dict:
    """One run of scripts/train.py's code in this process (`conftest.train_in_process`)."""
    return train_in_process(["--output_dir", str(output_dir), *RUN, *extra])


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _changed(a: dict, b: dict) -> set[str]:
    assert a.keys() == b.keys()
    return {k for k in a if not torch.equal(a[k], b[k])}


def _env(**extra) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env.update(extra)
    return env


def _script(*argv, env=None, ok=True) -> subprocess.CompletedProcess:
    """``python scripts/NAME.py ...`` as a user runs it."""
    proc = subprocess.run([sys.executable, *map(str, argv)], cwd=REPO_ROOT, env=env or _env(), capture_output=True,
                          text=True, timeout=400)  # fmt: skip
    assert (proc.returncode == 0) == ok, (proc.stdout + proc.stderr)[-4000:]
    return proc


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """The export of a 2-step run with the GAN on (a discriminator of 8 channels, 2 layers)."""
    out = tmp_path_factory.mktemp("base")
    _train(out, "--max_train_steps", "2", "--model_config", "tiny", "--disc_start", "0", *DISC)
    return out / "model"


def _model_weights(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


def _disc_weights(folder: Path) -> dict:
    return load_file(str(folder / DISCRIMINATOR_FILE))


# ---------------------------------------------------------------------------------------------------- step 0
def test_export_holds_the_discriminator_with_its_settings(base):
    discriminator = load_discriminator(base / DISCRIMINATOR_FILE)
    assert (discriminator.in_channels, discriminator.base_channels, discriminator.num_layers) == (3, 8, 2)
    assert _same(discriminator.state_dict(), _disc_weights(base))
    run_args = json.loads((base / "run_args.json").read_text())
    assert run_args["init_from"] is None and run_args["disc_channels"] == 8


def test_step_zero_of_an_init_from_run_is_the_loaded_model_and_its_discriminator(base, tmp_path):
    """Learning rates 0 and one step (the GAN starts at step 1): the exported EMA model equals the loaded one bit for
    bit, and so does the discriminator; the saved settings are used; run_args records the start."""
    result = _train(tmp_path, "--init_from", str(base), "--max_train_steps", "1", *FROZEN_LR)
    out = Path(result["model_dir"])
    assert _same(_model_weights(out), _model_weights(base))
    assert _same(_disc_weights(out), _disc_weights(base))
    run_args = json.loads((out / "run_args.json").read_text())
    assert (run_args["init_from"], run_args["init_from_commit"], run_args["model_config"]) == (str(base), None, None)
    assert (run_args["disc_channels"], run_args["disc_layers"]) == (8, 2)  # the saved discriminator's settings
    assert run_args["model_config_resolved"]["codebook_size"] == 256


def test_step_zero_from_a_groupvqvae_pipeline_component(base, tmp_path):
    """A diffusers GroupVQVAE inside a pipeline folder: --subfolder names it; the run starts from the same weights
    (the shells map 1:1); the pipeline root alone is refused."""
    pipeline = tmp_path / "pipeline"
    GroupVQVAE.from_groupvq(GroupVQModel.from_pretrained(base)).save_pretrained(pipeline / "vqvae")
    (pipeline / "model_index.json").write_text(json.dumps({"_class_name": "VQDiffusionPipeline", "vqvae": ["x", "y"]}))
    with pytest.raises(ValueError, match="pipeline folder.*--subfolder"):
        _train(tmp_path / "refused", "--init_from", str(pipeline), "--max_train_steps", "1")
    result = _train(tmp_path / "run", "--init_from", str(pipeline), "--subfolder", "vqvae", "--max_train_steps", "1",
                    "--no_init_discriminator", *FROZEN_LR)  # fmt: skip
    assert _same(_model_weights(Path(result["model_dir"])), _model_weights(base))


# ---------------------------------------------------------------------------------------------------- trainable
@pytest.mark.parametrize(
    "trainable, prefixes",
    [("quantizer", ("quantizer.",)), ("decoder", ("decoder.", "post_quant_conv.")),
     ("quantizer+decoder", ("quantizer.", "decoder.", "post_quant_conv.")), ("all", ("",))],
)  # fmt: skip
def test_freeze_parts_leaves_only_the_named_parts_trainable(tiny_model, trainable, prefixes):
    frozen = freeze_parts(tiny_model, trainable)
    for name, param in tiny_model.named_parameters():
        assert param.requires_grad == name.startswith(prefixes), name
        assert (name in frozen) != param.requires_grad
    assert not any(name.startswith("quantizer.core") for name, _ in tiny_model.named_parameters())  # cores: buffers


def test_trainable_quantizer_changes_only_the_projectors(base, tmp_path):
    """--trainable quantizer: after 2 steps only W_j, b_j differ from the loaded model (cores, encoder, decoder
    bit-identical); the optimizer holds state for those two only; the discriminator still trains (GAN on)."""
    _train(tmp_path, "--init_from", str(base), "--trainable", "quantizer", "--max_train_steps", "2", "--no_ema",
           "--checkpointing_steps", "2")  # fmt: skip
    assert _changed(_model_weights(tmp_path / "model"), _model_weights(base)) == {"quantizer.weight", "quantizer.bias"}
    assert _changed(_disc_weights(tmp_path / "model"), _disc_weights(base))  # the discriminator trained
    optimizer = torch.load(tmp_path / "checkpoints" / "checkpoint-2" / "optimizer.bin", weights_only=True)
    assert [len(group["params"]) for group in optimizer["param_groups"]] == [0, 2]  # encoder/decoder: none
    assert len(optimizer["state"]) == 2


def test_resume_of_an_init_from_run_equals_the_uninterrupted_run(base, tmp_path):
    args = ["--init_from", str(base), "--trainable", "quantizer+decoder", "--codebook_size", "512"]
    _train(tmp_path / "full", *args, "--max_train_steps", "3")
    _train(tmp_path / "split", *args, "--max_train_steps", "2", "--checkpointing_steps", "2")
    result = _train(tmp_path / "split", *args, "--max_train_steps", "3", "--resume_from_checkpoint", "latest")
    assert result["resumed_from"].endswith("checkpoint-2")
    assert _same(_model_weights(tmp_path / "full" / "model"), _model_weights(tmp_path / "split" / "model"))
    assert _same(_disc_weights(tmp_path / "full" / "model"), _disc_weights(tmp_path / "split" / "model"))


# ---------------------------------------------------------------------------------------------------- resize
def test_resize_then_train_exports_the_resized_config(base, tmp_path):
    """--codebook_size 512 --resize_mode extend --resize_seed 3: the model's own resize_codebook before step 1; the
    export's config and trained_group_sizes are those of the same resize done by hand, its cores equal that resize's
    (frozen), the encoder is untouched (--trainable quantizer+decoder)."""
    result = _train(tmp_path, "--init_from", str(base), "--codebook_size", "512", "--resize_mode", "extend",
                    "--resize_seed", "3", "--trainable", "quantizer+decoder", "--max_train_steps", "2")  # fmt: skip
    exported = GroupVQModel.from_pretrained(result["model_dir"])
    expected = GroupVQModel.from_pretrained(base)
    expected.resize_codebook(512, mode="extend", seed=3)
    assert exported.config.codebook_size == 512 and exported.config.trained_group_sizes == [32] * 8
    for key in ("codebook_size", "group_sizes", "group_ranks", "trained_group_sizes", "num_groups", "core_std"):
        assert getattr(exported.config, key) == getattr(expected.config, key), key
    assert torch.equal(exported.quantizer.core, expected.quantizer.core)
    a, b = exported.state_dict(), expected.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith(("encoder.", "quant_conv.")))
    assert json.loads((Path(result["model_dir"]) / "run_args.json").read_text())["resize_mode"] == "extend"


# ---------------------------------------------------------------------------------------------------- the Hub
def test_discriminator_round_trips_through_push_to_hub_and_a_hub_init_from(base, tmp_path):
    """scripts/push_to_hub.py --include_discriminator uploads discriminator.safetensors (named in the card; without
    the flag it stays home); scripts/train.py --init_from REPO loads model and discriminator and records the commit."""
    with HubServer(tokens={"hf_writer": HubUser("tester")}) as hub:
        env = _env(HF_ENDPOINT=hub.url, HF_TOKEN="hf_writer", HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "hf_home"),
                   HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1", NO_PROXY="127.0.0.1,localhost")  # fmt: skip
        push = ["scripts/push_to_hub.py", "--model", base, "--training_args", base / "run_args.json"]
        _script(*push, "--repo_id", "tester/with-disc", "--include_discriminator", env=env)
        _script(*push, "--repo_id", "tester/without-disc", env=env)
        files = hub.files("tester/with-disc")
        assert files[DISCRIMINATOR_FILE] == (base / DISCRIMINATOR_FILE).read_bytes()
        assert "discriminator.safetensors` (2 layers, 8 base channels" in files["README.md"].decode()
        assert DISCRIMINATOR_FILE not in hub.files("tester/without-disc")
        commit = hub.repos["tester/with-disc"].commits[-1]["oid"]

        out = tmp_path / "from-hub"
        _script("scripts/train.py", "--output_dir", out, *RUN, "--init_from", "tester/with-disc", "--max_train_steps",
                "1", *FROZEN_LR, env=env)  # fmt: skip
    assert _same(_model_weights(out / "model"), _model_weights(base))
    assert _same(_disc_weights(out / "model"), _disc_weights(base))
    run_args = json.loads((out / "model" / "run_args.json").read_text())
    assert (run_args["init_from"], run_args["init_from_commit"]) == ("tester/with-disc", commit)
    from groupvq_hf.hub import describe_recipe

    assert f"**Fine-tuned from** `tester/with-disc` (commit `{commit}`)" in describe_recipe(run_args)
    proc = _script("scripts/push_to_hub.py", "--model", tmp_path, "--repo_id", "tester/x", "--include_discriminator",
                   env=_env(HF_TOKEN="hf_writer"), ok=False)  # fmt: skip
    assert "config.json" in proc.stderr


def test_push_to_hub_include_discriminator_needs_one(tmp_path, tiny_model):
    from groupvq_hf.hub import publish

    tiny_model.save_pretrained(tmp_path / "model")
    with pytest.raises(ValueError, match="holds no discriminator.safetensors"):
        publish(tmp_path / "model", "tester/x", token="hf_x", include_discriminator=True)
    with pytest.raises(ValueError, match="saved folder"):
        publish(tiny_model, "tester/x", token="hf_x", include_discriminator=True)


# ---------------------------------------------------------------------------------------------------- SimVQ
def _simvq_checkpoint_with(discriminator_state: dict, path: Path) -> Path:
    """The fixture's checkpoint with its `loss.discriminator.*` replaced (the fixture holds a stub of one layer)."""
    checkpoint = torch.load(FIXTURE / "simvq-tiny.ckpt", map_location="cpu", weights_only=True)
    state = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("loss.discriminator.")}
    state.update({f"loss.discriminator.{k}": v for k, v in discriminator_state.items()})
    torch.save({**checkpoint, "state_dict": state}, path)
    return path


def test_simvq_discriminator_converts_key_by_key_and_starts_a_run(tmp_path):
    """taming's NLayerDiscriminator (3 layers, 16 channels, BatchNorm) -> discriminator.safetensors, each key equal;
    the converted folder starts a run whose step 0 is the converted model and discriminator."""
    torch.manual_seed(0)
    taming = PatchGANDiscriminator(3, 16, 3).state_dict()  # the same layout, key for key
    taming = {k: v + torch.randn_like(v) if v.is_floating_point() else v + 5 for k, v in taming.items()}
    ckpt = _simvq_checkpoint_with(taming, tmp_path / "simvq.ckpt")
    out = tmp_path / "converted"
    proc = _script("scripts/convert_checkpoint.py", "--from_simvq", ckpt, "--config", FIXTURE / "simvq-tiny.yaml",
                   out, "--keep_discriminator")  # fmt: skip
    assert json.loads(proc.stdout)["discriminator"] == {"in_channels": 3, "disc_channels": 16, "disc_layers": 3}
    converted = _disc_weights(out)
    assert converted.keys() == taming.keys() and all(torch.equal(converted[k], taming[k]) for k in taming)

    result = _train(tmp_path / "run", "--init_from", str(out), "--max_train_steps", "1", *FROZEN_LR)
    assert _same(_model_weights(Path(result["model_dir"])), _model_weights(out))
    assert _same(_disc_weights(Path(result["model_dir"])), converted)
    assert GroupVQModel.from_pretrained(result["model_dir"]).config.backbone == "simvq"

    _script("scripts/convert_checkpoint.py", "--from_simvq", ckpt, "--config", FIXTURE / "simvq-tiny.yaml",
            tmp_path / "plain")  # fmt: skip
    assert not (tmp_path / "plain" / DISCRIMINATOR_FILE).exists()  # kept only when asked


def test_simvq_discriminator_that_is_no_patchgan_is_refused_naming_the_key(tmp_path):
    from groupvq_hf.hub import convert_simvq

    yaml = FIXTURE / "simvq-tiny.yaml"
    with pytest.raises(ValueError, match="not a PatchGAN"):  # the fixture's one-layer stub
        convert_simvq(FIXTURE / "simvq-tiny.ckpt", yaml, tmp_path / "a", keep_discriminator=True)
    state = PatchGANDiscriminator(3, 8, 2).state_dict()
    del state["main.8.bias"]
    with pytest.raises(ValueError, match="lacks 'loss.discriminator.main.8.bias'"):
        convert_simvq(_simvq_checkpoint_with(state, tmp_path / "b.ckpt"), yaml, tmp_path / "b", keep_discriminator=True)
    state = {**PatchGANDiscriminator(3, 8, 2).state_dict(), "main.9.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="'loss.discriminator.main.9.weight' has no place"):
        convert_simvq(_simvq_checkpoint_with(state, tmp_path / "c.ckpt"), yaml, tmp_path / "c", keep_discriminator=True)
    assert not any((tmp_path / name).exists() for name in "abc")  # refused before anything is written
    proc = _script("scripts/convert_checkpoint.py", "a", "b", "--keep_discriminator", ok=False)
    assert "--keep_discriminator apply to --from_simvq only" in proc.stderr


# ---------------------------------------------------------------------------------------------------- bad input
def test_arguments_refused_before_anything_loads():
    with pytest.raises(ValueError, match="`--trainable` must be one of all, quantizer, decoder, quantizer\\+decoder"):
        parse_args(["--trainable", "encoder"])
    with pytest.raises(ValueError, match="codebook size of a fresh model is set in `--model_config`"):
        parse_args(["--codebook_size", "512"])
    with pytest.raises(ValueError, match="`--resize_mode` needs `--codebook_size`"):
        parse_args(["--init_from", "x", "--resize_mode", "resample"])
    with pytest.raises(ValueError, match="`--no_init_discriminator` applies to `--init_from` only"):
        parse_args(["--no_init_discriminator"])
    with pytest.raises(ValueError, match="adaptive_disc_weight"):
        parse_args(["--init_from", "x", "--trainable", "quantizer", "--adaptive_disc_weight"])
    args = parse_args(["--init_from", "x", "--codebook_size", "512"])
    assert (args.resize_mode, args.resize_seed, args.model_config, args.disc_channels) == ("extend", 0, None, None)
    assert (parse_args([]).disc_channels, parse_args([]).disc_layers, parse_args([]).trainable) == (64, 3, "all")


def test_init_from_that_is_no_model_is_refused_before_training(base, tmp_path):
    (tmp_path / "empty").mkdir()
    corrupt = tmp_path / "corrupt"
    shutil.copytree(base, corrupt)
    (corrupt / "model.safetensors").write_bytes((base / "model.safetensors").read_bytes()[:1000])
    cases = {
        str(tmp_path / "empty"): "not a saved GroupVQModel or GroupVQVAE",
        str(corrupt): "cannot load the model",
        str(base / "config.json"): "is a file",
        "no/such/folder/here": "neither an existing folder nor a Hub repo id",
    }
    for init_from, message in cases.items():
        with pytest.raises(ValueError, match=message):
            _train(tmp_path / "out", "--init_from", init_from, "--max_train_steps", "1")
        assert not (tmp_path / "out" / "model").exists()


def test_init_from_settings_that_disagree_are_named(base, tmp_path):
    """--disc_channels against the saved discriminator, --model_config against the loaded config, a codebook size the
    groups cannot split: errors naming both sides."""
    with pytest.raises(ValueError, match="`--disc_channels` 16 does not match.*disc_channels 8"):
        _train(tmp_path / "a", "--init_from", str(base), "--disc_channels", "16", "--max_train_steps", "1")
    config = json.loads((base / "config.json").read_text())
    (tmp_path / "other.json").write_text(json.dumps({**config, "codebook_size": 512}))
    with pytest.raises(ValueError, match="codebook_size: --model_config 512, --init_from 256"):
        _train(tmp_path / "b", "--init_from", str(base), "--model_config", str(tmp_path / "other.json"),
               "--max_train_steps", "1")  # fmt: skip
    with pytest.raises(ValueError, match="`--codebook_size` 100"):
        _train(tmp_path / "c", "--init_from", str(base), "--codebook_size", "100", "--max_train_steps", "1")
    # the same config is accepted; --no_init_discriminator takes the flags (or the defaults) instead
    result = _train(tmp_path / "d", "--init_from", str(base), "--model_config", "tiny", "--no_init_discriminator",
                    "--disc_channels", "16", "--max_train_steps", "1", "--disc_start", "5")  # fmt: skip
    assert load_discriminator(Path(result["model_dir"]) / DISCRIMINATOR_FILE).base_channels == 16


def test_fine_tuning_at_another_resolution_exports_that_resolution(base, tmp_path):
    """A convolutional model fine-tuned at 64 px exports ``sample_size`` 64 and a 64 px image processor (it exported
    the loaded 32); a ViT, whose stored position embeddings cover its ``sample_size`` grid, is refused."""
    run = [a if a != "32" else "64" for a in RUN]  # --resolution 64
    train_in_process(["--output_dir", str(tmp_path / "ft"), *run, "--init_from", str(base), "--max_train_steps", "1"])
    out = tmp_path / "ft" / "model"
    config, processor = (json.loads((out / name).read_text()) for name in ("config.json", "preprocessor_config.json"))
    assert config["sample_size"] == 64 and processor["crop_size"] == {"height": 64, "width": 64}
    vit = tmp_path / "vit"
    GroupVQModel(GroupVQConfig.from_preset("vit-tiny", sample_size=32)).save_pretrained(vit)
    with pytest.raises(ValueError, match="`--resolution` 64 differs from the ViT's `sample_size` 32"):
        train_in_process(["--output_dir", str(tmp_path / "ft-vit"), *run, "--init_from", str(vit), "--max_train_steps", "1"])
