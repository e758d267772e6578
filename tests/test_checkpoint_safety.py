"""Training state that cannot run code, kills at awkward moments, a full disk (issue 19, items 2, 6, 7)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def _python(driver: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run tests/drivers/DRIVER in `cwd` with the repository's `src` on the path."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT / "src"))
    return subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "drivers" / driver)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def test_a_kill_during_the_final_export_leaves_no_model_copy_behind(tmp_path):
    """Killed (SIGKILL) while `save_pretrained` writes inside the export's temporary folder: the next export
    leaves only `model` (no `.tmp-` folder of either save, nested or not)."""
    killed = _python("export_killed.py", tmp_path)
    assert killed.returncode == -9, killed.stderr[-2000:]
    again = _python("export_again.py", tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model"]
    assert json.loads((tmp_path / "out" / "model" / "run_args.json").read_text()) == {"seed": 2}


def test_nested_atomic_directories_write_once_and_stale_nested_leftovers_are_cleaned(tmp_path):
    from groupvq_hf.fileio import atomic_directory, recover_directory

    with atomic_directory(tmp_path / "model") as outer, atomic_directory(outer) as inner:
        assert inner == outer  # already invisible to readers: written in place, not copied once more
        (inner / "weights").write_text("w")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"] and (tmp_path / "model" / "weights").is_file()
    # a leftover of an earlier version's nested save, by a process that no longer runs (pid 0 never is ours)
    stale = tmp_path / ".tmp-.tmp-model.999999999.0123abcd.999999999.4567cdef"
    stale.mkdir()
    recover_directory(tmp_path / "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# ------------------------------------------------------------------------------------------------ item 2
class _RunsCode:
    """A pickle that, when unpickled with weights_only=False, creates a marker file (as os.system could anything)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def checkpointed_run(tmp_path_factory):
    """A tiny run with a checkpoint at step 2 (EMA on), written by the training script's code."""
    from test_training import _train

    out = tmp_path_factory.mktemp("run")
    _train(out, "--max_train_steps", "2", "--checkpointing_steps", "2", "--validation_steps", "0")
    return out / "checkpoints" / "checkpoint-2"


def _resume_copy(checkpoint: Path, tmp_path: Path) -> Path:
    import shutil

    out = tmp_path / "run"
    shutil.copytree(checkpoint, out / "checkpoints" / checkpoint.name)
    return out


def _resume(out: Path):
    from test_training import _train

    return _train(out, "--max_train_steps", "3", "--validation_steps", "0", "--resume_from_checkpoint", "latest")


def test_checkpoint_holds_the_ema_as_safetensors_and_json_no_pickle(checkpointed_run):
    from safetensors.torch import load_file

    from groupvq_hf.training import EMA_STATE_FILE, EMA_WEIGHTS_FILE

    names = {p.name for p in checkpointed_run.iterdir()}
    assert {EMA_WEIGHTS_FILE, EMA_STATE_FILE} <= names and not any(n.startswith("custom_checkpoint") for n in names)
    weights = load_file(str(checkpointed_run / EMA_WEIGHTS_FILE))
    model = load_file(str(checkpointed_run / "model.safetensors"))
    assert set(weights) <= set(model) and "encoder.conv_in.weight" in weights  # keyed by parameter name
    assert json.loads((checkpointed_run / EMA_STATE_FILE).read_text())["optimization_step"] == 2


@pytest.mark.parametrize("victim", ["custom_checkpoint_0.pkl", "random_states_0.pkl", "legacy", "optimizer.bin"])
def test_a_crafted_pickle_in_a_checkpoint_never_runs(checkpointed_run, tmp_path, victim):
    """The earlier release's pickled EMA file (beside the safe files, or alone as in that release's checkpoints),
    accelerate's RNG file and its optimizer file (which accelerate loads itself), replaced by a pickle that would
    create a marker: refused naming the file (the optimizer's among the checkpoint's pickled files), never with
    torch's advice to load it with weights_only=False."""
    from groupvq_hf.training import EMA_STATE_FILE, EMA_WEIGHTS_FILE

    out = _resume_copy(checkpointed_run, tmp_path)
    marker, folder = tmp_path / "pwned", out / "checkpoints" / "checkpoint-2"
    if victim == "legacy":
        (folder / EMA_WEIGHTS_FILE).unlink()
        (folder / EMA_STATE_FILE).unlink()
        victim = "custom_checkpoint_0.pkl"
    torch.save({"shadow_params": _RunsCode(marker)}, folder / victim)
    with pytest.raises(ValueError, match=victim) as refusal:
        _resume(out)
    assert not marker.exists() and "weights_only=False" not in str(refusal.value)


def test_a_legacy_pickled_ema_resumes_through_a_weights_only_load(checkpointed_run, tmp_path):
    """A checkpoint of the earlier release (EMA pickled by accelerate's custom state): read with weights_only=True,
    converted to the safe files, and resumed to the same weights as the new format."""
    from safetensors.torch import load_file

    from groupvq_hf import GroupVQModel
    from groupvq_hf.training import EMA_STATE_FILE, EMA_WEIGHTS_FILE, ema_parameter_names, resolve_model_config

    reference = _resume_copy(checkpointed_run, tmp_path / "a")
    _resume(reference)
    out = _resume_copy(checkpointed_run, tmp_path / "b")
    folder = out / "checkpoints" / "checkpoint-2"
    counters = json.loads((folder / EMA_STATE_FILE).read_text())
    weights = load_file(str(folder / EMA_WEIGHTS_FILE))  # in name order; the pickle held parameter order
    names = ema_parameter_names(GroupVQModel(resolve_model_config("tiny", 32)))
    shadow = [weights[name] for name in names]
    torch.save({**counters, "shadow_params": shadow}, folder / "custom_checkpoint_0.pkl")
    (folder / EMA_STATE_FILE).unlink()
    (folder / EMA_WEIGHTS_FILE).unlink()
    _resume(out)
    a, b = (load_file(str(run / "model" / "model.safetensors")) for run in (reference, out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_legacy_ema_converted_by_a_run_with_another_decay_keeps_its_own_settings(tmp_path):
    """A resume that allows `--ema_decay` to change converts the earlier release's pickle: the running EMA takes
    the new decay, the converted checkpoint keeps the decay it was trained with (it recorded the new one)."""
    from groupvq_hf.training import EMA_STATE_FILE, LEGACY_EMA_FILE, convert_legacy_ema, load_ema_state
    from groupvq_hf.training.loop import build_ema

    names, parameters = ["a", "b"], [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2, 2))]
    trained = build_ema(parameters, 0.999, warmup=True)
    for _ in range(3):
        trained.step(parameters)
    # a key this diffusers release does not know, of a type JSON cannot hold: checked out, not written
    torch.save({**trained.state_dict(), "a_later_counter": torch.ones(2)}, tmp_path / LEGACY_EMA_FILE)
    resuming = build_ema([torch.nn.Parameter(torch.zeros_like(p)) for p in parameters], 0.5, warmup=True)
    legacy = load_ema_state(resuming, names, tmp_path)
    assert legacy is not None and resuming.decay == 0.5 and resuming.optimization_step == 3
    convert_legacy_ema(legacy, names, tmp_path)
    assert not (tmp_path / LEGACY_EMA_FILE).exists()
    assert json.loads((tmp_path / EMA_STATE_FILE).read_text()) == {
        key: value for key, value in trained.state_dict().items() if key != "shadow_params"
    }
    again = build_ema([torch.nn.Parameter(torch.zeros_like(p)) for p in parameters], 0.5, warmup=True)
    assert load_ema_state(again, names, tmp_path) is None  # the safe files now
    assert all(torch.equal(a, b) for a, b in zip(again.shadow_params, trained.shadow_params))


def test_the_ema_counters_need_only_their_step_and_settings_of_the_right_type(tmp_path):
    """The settings are the resuming run's, so a counters file of another diffusers release (a setting missing, one
    unknown) resumes; a step that is missing or not an integer, or a known setting of the wrong type, is refused
    naming the file."""
    from groupvq_hf.training import EMA_STATE_FILE, load_ema_state, save_ema_state
    from groupvq_hf.training.loop import build_ema

    names, parameters = ["a"], [torch.nn.Parameter(torch.randn(3))]
    save_ema_state(build_ema(parameters, 0.9, warmup=True), names, tmp_path)
    state_file = tmp_path / EMA_STATE_FILE
    state_file.write_text(json.dumps({"optimization_step": 7, "a_later_setting": [1, 2]}))
    ema = build_ema(parameters, 0.9, warmup=True)
    assert load_ema_state(ema, names, tmp_path) is None
    assert ema.optimization_step == 7 and ema.decay == 0.9 and ema.min_decay == 0.0
    for counters in ({}, {"optimization_step": "7"}, {"optimization_step": True}, {"optimization_step": -1},
                     {"optimization_step": 7, "decay": "0.9"}, [7]):
        state_file.write_text(json.dumps(counters))
        with pytest.raises(ValueError, match=re.escape(str(state_file))):
            load_ema_state(build_ema(parameters, 0.9, warmup=True), names, tmp_path)


def test_a_first_release_torch_compile_checkpoint_resumes_with_its_orig_mod_keys_renamed(checkpointed_run, tmp_path):
    """The first release wrapped the encoder and decoder in torch.compile, so its checkpoints hold keys such as
    `encoder._orig_mod.conv_in.weight`: renamed to plain keys in place, then resumed to the same weights."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    reference = _resume_copy(checkpointed_run, tmp_path / "a")
    _resume(reference)
    out = _resume_copy(checkpointed_run, tmp_path / "b")
    path = out / "checkpoints" / "checkpoint-2" / "model.safetensors"
    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata()
    weights = load_file(str(path))
    compiled = {re.sub(r"^(encoder|decoder)\.", r"\1._orig_mod.", name): t for name, t in weights.items()}
    assert sum("_orig_mod" in name for name in compiled) > 10
    save_file(compiled, str(path), metadata=metadata)
    _resume(out)
    renamed = load_file(str(path))
    assert renamed.keys() == weights.keys() and all(torch.equal(renamed[k], weights[k]) for k in weights)
    a, b = (load_file(str(run / "model" / "model.safetensors")) for run in (reference, out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("damage", ["empty_ema", "ema_shape", "ema_counters", "model_keys", "optimizer_shape"])
def test_a_checkpoint_file_that_does_not_match_the_run_is_refused_naming_it(checkpointed_run, tmp_path, damage):
    from safetensors.torch import load_file, save_file

    from groupvq_hf.training import EMA_STATE_FILE, EMA_WEIGHTS_FILE

    out = _resume_copy(checkpointed_run, tmp_path)
    folder = out / "checkpoints" / "checkpoint-2"
    if damage == "empty_ema":
        save_file({}, folder / EMA_WEIGHTS_FILE)
        name = EMA_WEIGHTS_FILE
    elif damage == "ema_shape":
        weights = load_file(str(folder / EMA_WEIGHTS_FILE))
        weights["encoder.conv_in.weight"] = weights["encoder.conv_in.weight"][:1].contiguous()
        save_file(weights, folder / EMA_WEIGHTS_FILE)
        name = EMA_WEIGHTS_FILE
    elif damage == "ema_counters":
        (folder / EMA_STATE_FILE).write_text("{}")
        name = EMA_STATE_FILE
    elif damage == "optimizer_shape":  # loads (weights_only), but one Adam moment no longer fits its parameter
        state = torch.load(folder / "optimizer.bin", weights_only=True)
        moments = next(s for s in state["state"].values() if "exp_avg" in s)
        moments["exp_avg"] = moments["exp_avg"].flatten()[:1].clone()
        torch.save(state, folder / "optimizer.bin")
        name = "optimizer.bin"
    else:
        weights = load_file(str(folder / "model.safetensors"))
        weights.pop("encoder.conv_in.weight")
        save_file(weights, folder / "model.safetensors")
        name = "model.safetensors"
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        _resume(out)


# ------------------------------------------------------------------------------------------------ item 6
def test_a_kill_during_validation_is_redone_on_resume(tmp_path, monkeypatch):
    """Killed while validating step 2 (its checkpoint already written), in the middle of appending its entry: the
    resumed run drops the cut entry, validates step 2 again, and its validation log equals the uninterrupted run's."""
    from test_training import _train

    from groupvq_hf.training import VALIDATION_LOG_FILE, loop

    run = ["--checkpointing_steps", "2", "--validation_steps", "2"]
    _train(tmp_path / "full", "--max_train_steps", "4", *run)
    real_append = loop.append_validation_log

    def killed(path, step, usage):
        with open(path, "a") as log:
            log.write('{"step": 2, "codebook_usage": 0.')  # cut short: no newline
        raise KeyboardInterrupt("killed during validation")

    monkeypatch.setattr(loop, "append_validation_log", killed)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "split", "--max_train_steps", "4", *run)
    monkeypatch.setattr(loop, "append_validation_log", real_append)
    assert loop.read_validation_log(tmp_path / "split" / VALIDATION_LOG_FILE) == []  # the cut entry is not one
    _train(tmp_path / "split", "--max_train_steps", "4", "--resume_from_checkpoint", "latest", *run)
    full = (tmp_path / "full" / VALIDATION_LOG_FILE).read_text().splitlines()
    assert [json.loads(line)["step"] for line in full] == [2, 4]
    assert (tmp_path / "split" / VALIDATION_LOG_FILE).read_text().splitlines() == full


def test_a_damaged_validation_log_line_is_named(tmp_path):
    from groupvq_hf.training import loop

    log = tmp_path / "validation_log.jsonl"
    log.write_text('{"step": 2, "codebook_usage": 0.5}\n\nnot json\n{"step": 4, "codebook_usage": 0.6}\n')
    with pytest.raises(ValueError, match=r"validation_log.jsonl line 3 is not a validation entry .*'not json'"):
        loop.trim_validation_log(log, 4)
    log.write_text('{"step": 2, "codebook_usage": 0.5}\n{"step": 4, "codebook_usage": 0.6}\n{"step": 6, "cod')
    loop.trim_validation_log(log, 4)
    assert log.read_text() == '{"step": 2, "codebook_usage": 0.5}\n{"step": 4, "codebook_usage": 0.6}\n'
    loop.trim_validation_log(log, 3)
    assert [entry["step"] for entry in loop.read_validation_log(log)] == [2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["validation_log.jsonl"]  # no temporary file left


# ------------------------------------------------------------------------------------------------ a full disk
@pytest.mark.parametrize("error", ["oserror", "torch_enforce"])
def test_a_full_disk_during_a_checkpoint_names_the_file_and_the_space_needed(
    tmp_path, monkeypatch, error, fresh_accelerate_state
):
    """The second checkpoint's optimizer file hits a full disk (a write raising ENOSPC, or torch's own
    `[enforce fail ...]` RuntimeError): the error names that file, the free space and the space a checkpoint takes;
    the first checkpoint stays the newest complete one and no temporary folder is left."""
    import errno

    import accelerate.checkpointing
    from accelerate import Accelerator

    from groupvq_hf.training import list_checkpoints, save_checkpoint

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(64, 64)
    model, optimizer = accelerator.prepare(model, torch.optim.Adam(model.parameters()))
    model(torch.ones(1, 64)).sum().backward()
    optimizer.step()
    root = tmp_path / "checkpoints"
    save_checkpoint(accelerator, root, 1, {"global_step": 1}, None, {"seed": 0})
    size = sum(p.stat().st_size for p in (root / "checkpoint-1").iterdir())
    real_save = accelerate.checkpointing.save

    def disk_fills(obj, f, *args, **kwargs):
        if Path(f).name != "optimizer.bin":
            return real_save(obj, f, *args, **kwargs)
        Path(f).write_bytes(b"\0" * 100)
        if error == "oserror":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 4480 vs 4374")

    monkeypatch.setattr(accelerate.checkpointing, "save", disk_fills)
    with pytest.raises(OSError, match=rf"optimizer\.bin.*free.*about {size:,} bytes") as raised:
        save_checkpoint(accelerator, root, 2, {"global_step": 2}, None, {"seed": 0})
    assert raised.value.errno == errno.ENOSPC
    assert [p.name for p in list_checkpoints(root, complete_only=False)] == ["checkpoint-1"]
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-1"]
