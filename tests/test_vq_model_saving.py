"""GroupVQVAE / GroupVQModel folders: the code travels with a saved GroupVQVAE and loads without groupvq_hf,
push_to_hub uploads it, and saving is atomic (two processes on one folder, saving over a folder)."""

import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from conftest import dummy_inputs, tiny_groupvq_model, tiny_vae

from groupvq_hf import GroupVQModel, GroupVQVAE

DRIVERS = Path(__file__).resolve().parent / "drivers"


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
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    command = [sys.executable, str(DRIVERS / "load_vae_remote_code.py"), str(tmp_path / "vae"), str(tmp_path / "ref.pt")]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
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


# --------------------------------------------------------------------------------------------- atomic saving
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
    script = DRIVERS / "save_one_folder.py"
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
