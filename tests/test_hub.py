"""Publishing, offline: push to a local Hub server (`tests/hub_server.py`), then load back where groupvq_hf cannot be
imported. huggingface_hub reads HF_ENDPOINT when imported, so pushes and loads run in subprocesses pointed at it."""

import copy
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from huggingface_hub.errors import LocalTokenNotFoundError
from hub_server import HubServer, HubUser

from groupvq_hf import GroupVQConfig, GroupVQModel, GroupVQVAE
from groupvq_hf.hub.publishing import (
    check_no_secrets,
    normalize_eval_results,
    publish,
    render_model_card,
    resize_study_markdown,
    resolve_token,
    upload_file_list,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, "scripts", "push_to_hub.py")
DRIVERS = Path(__file__).resolve().parent / "drivers"
TOKENS = {
    "hf_writer": HubUser("tester", orgs=["groupvq-org"]),
    "hf_reader": HubUser("reader", role="read"),
    "hf_scoped": HubUser("scoped", role="fineGrained"),  # passes the local check, refused by the server
}
TRANSFORMERS_FILES = {
    "README.md", "config.json", "model.safetensors", "preprocessor_config.json", "configuration_groupvq.py",
    "modeling_groupvq.py", "quantizer.py", "image_processing_groupvq.py", "vit.py", "simvq_backbone.py", "shells.py",
    "fileio.py",
}
EVAL_RESULTS = {"dataset": "imagenet", "split": "validation", "resolution": 32, "max_samples": 64,
                "metrics": {"rfid": 5.25, "lpips": 0.21, "psnr": 21.5, "ssim": 0.71, "codebook_usage": 0.98}}
RESIZE_STUDY = {"dataset": "demo", "rows": [  # as scripts/resize_study.py writes it
    {"method": "trained", "mode": None, "power": 0, "codebook_size": 256, "groups": 8, "rfid": 5.25, "psnr": 21.5},
    {"method": "self-extension", "mode": "extend", "power": 1, "codebook_size": 512, "groups": 8, "rfid": 5.1,
     "psnr": 21.9}]}

PUSHER = DRIVERS / "hub_push.py"

LOADER = DRIVERS / "hub_load.py"


def _env(hub: HubServer, home) -> dict:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "HF_HOME": str(home / "hf_home"),
        "HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_writer", "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "NO_PROXY": "127.0.0.1,localhost",
    }


def _run(script, args, env, cwd):
    result = subprocess.run([sys.executable, str(script), *map(str, args)], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def local_model():
    torch.manual_seed(0)
    return GroupVQModel(GroupVQConfig.from_preset("tiny", sample_size=32)).eval()


@pytest.fixture(scope="module")
def hub():
    with HubServer(tokens=TOKENS) as server:
        yield server


@pytest.fixture(scope="module")
def published(hub, local_model, tmp_path_factory):
    """Push with the script (transformers + diffusers formats, and the refused cases) and with the libraries' own
    `push_to_hub`, then load everything back in a process where groupvq_hf cannot be imported."""
    work = tmp_path_factory.mktemp("publish")
    local_model.save_pretrained(work / "model")
    (work / "eval.json").write_text(json.dumps(EVAL_RESULTS))
    (work / "study.json").write_text(json.dumps(RESIZE_STUDY))
    pushes = work / "push"
    pushes.mkdir()
    args = [SCRIPT, work / "model", work / "eval.json", work / "study.json", work / "report.json"]
    _run(PUSHER, args, _env(hub, pushes), pushes)
    report = json.loads((work / "report.json").read_text())

    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    torch.save(pixels, work / "pixels.pt")
    loads = work / "load"
    loads.mkdir()
    _run(LOADER, [work / "pixels.pt", work / "loaded.pt"], _env(hub, loads), loads)
    return {"report": report, "loaded": torch.load(work / "loaded.pt"), "pixels": pixels}


# ------------------------------------------------------------------------------------------------ against the server
def test_script_uploads_weights_code_processor_and_card_only(hub, published):
    assert published["report"]["cli"] == "ok"
    files = hub.files("tester/groupvq-tiny")
    assert set(files) == TRANSFORMERS_FILES
    config = json.loads(files["config.json"])
    assert config["auto_map"] == {"AutoConfig": "configuration_groupvq.GroupVQConfig",
                                  "AutoModel": "modeling_groupvq.GroupVQModel"}
    assert config["codebook_size"] == 512  # resized before publishing
    assert "AutoImageProcessor" in json.loads(files["preprocessor_config.json"])["auto_map"]
    assert b"hf_writer" not in b"".join(files.values())
    # everything went as regular commit content: no LFS / Xet transfer, and no endpoint the server does not know
    assert hub.unhandled == []
    assert not any("lfs" in path or "xet" in path for _, path, _ in hub.requests)


def test_libraries_push_to_hub_publish_a_loadable_folder(hub, published):
    assert published["report"]["cli_card_first"] == "ok"
    assert set(hub.files("tester/native")) == TRANSFORMERS_FILES
    # push_to_hub onto the existing repo: the preupload oids show every file unchanged, so no empty commit is made
    assert [c["summary"] for c in hub.repos["tester/native"].commits] == ["Upload Group-VQ tokenizer"]
    assert [r[:2] for r in hub.requests].count(("POST", "/api/models/tester/native/preupload/main")) == 2
    card = ModelCard(hub.files("tester/native")["README.md"].decode())
    assert "groupvq" in card.data.tags and "## Resizing the codebook" in card.text  # push_to_hub kept the card
    diffusers_files = set(hub.files("tester/native-diffusers"))
    assert {"config.json", "diffusion_pytorch_model.safetensors", "vq_model.py", "quantizer.py", "shells.py",
            "fileio.py"} <= diffusers_files
    assert json.loads(hub.files("tester/native-diffusers")["config.json"])["auto_map"] == {
        "AutoModel": "vq_model.GroupVQVAE"}
    scripted = set(hub.files("groupvq-org/groupvq-tiny-diffusers"))
    assert scripted == {"README.md", "config.json", "diffusion_pytorch_model.safetensors", "vq_model.py",
                        "quantizer.py", "shells.py", "fileio.py", "preprocessor_config.json",
                        "image_processing_groupvq.py"}
    assert hub.repos["groupvq-org/groupvq-tiny-diffusers"].private


def test_model_card_metadata_parses(hub, published):
    card = ModelCard(hub.files("tester/groupvq-tiny")["README.md"].decode())
    data = card.data
    assert (data.library_name, data.license, data.pipeline_tag) == ("transformers", "apache-2.0", "image-to-image")
    assert {"groupvq", "vector-quantization", "image-tokenizer"} <= set(data.tags)
    assert data.datasets == ["ILSVRC/imagenet-1k"]
    results = {r.metric_type: r.metric_value for r in data.eval_results}
    assert results == {"fid": 5.25, "lpips": 0.21, "psnr": 21.5, "ssim": 0.71, "codebook_usage": 0.98}
    assert {r.dataset_type for r in data.eval_results} == {"ILSVRC/imagenet-1k"}
    text = card.text
    assert "| Codebook size n | 512 |" in text and "| Groups k | 8 |" in text and "| Core rank r_j | 16 each |" in text
    assert "from 256 to 512 codes by self-extension" in text
    assert "| + self-extension (x2) | 512 | 8 | 5.10 | 21.90 |" in text  # the resize study, Table 2 layout
    assert 'AutoModel.from_pretrained("tester/groupvq-tiny", trust_remote_code=True)' in text
    assert "Group-Wise Optimization for Self-Extensible Codebooks in Vector Quantized Models" in text
    assert "Zheng, Hong-Kai and Li, Piji" in text
    diffusers_card = ModelCard(hub.files("groupvq-org/groupvq-tiny-diffusers")["README.md"].decode())
    assert diffusers_card.data.library_name == "diffusers" and diffusers_card.data.eval_results is None
    assert 'diffusers import AutoModel' in diffusers_card.text


def test_load_without_groupvq_hf_matches_local_model(published, local_model):
    pixels, loaded = published["pixels"], published["loaded"]
    for repo, size in (("tester/groupvq-tiny", 512), ("tester/native", 256)):
        remote = loaded[repo]
        assert remote["module"].startswith("transformers_modules."), remote["module"]
        assert remote["processor_module"].startswith("transformers_modules.")
        assert remote["codebook_size"] == size
        reference = copy.deepcopy(local_model)  # resized below exactly as the published / loaded model was
        with torch.no_grad():
            if size == 512:
                reference.resize_codebook(512, mode="extend", seed=0)
            expected = reference(pixels)
            assert torch.equal(remote["reconstruction"], expected.reconstruction)
            assert torch.equal(remote["indices"], expected.indices)
            assert remote["resampled_sizes"] == reference.resize_codebook(128, mode="resample", seed=1) == [16] * 8
            assert torch.equal(remote["decoded"], reference.decode_indices(expected.indices % 128))
        assert remote["processed"].shape == (1, 3, 32, 32)
        assert torch.equal(remote["processed"], local_model.default_image_processor()(
            images=[_test_image()], return_tensors="pt").pixel_values)
    vae = GroupVQVAE.from_groupvq(local_model).eval()
    with torch.no_grad():
        latents, sample = vae.encode(pixels).latents, vae(pixels).sample
    for repo in ("groupvq-org/groupvq-tiny-diffusers", "tester/native-diffusers"):
        remote = loaded[repo]
        assert not remote["module"].startswith("groupvq_hf"), remote["module"]
        assert torch.equal(remote["latents"], latents)
        assert torch.equal(remote["sample"], sample)


@pytest.mark.parametrize(
    "case, message",
    [
        ("no_token", "No Hugging Face token found: set the HF_TOKEN environment variable or log in"),
        ("invalid_token", "token (HF_TOKEN or the saved login) is invalid or expired"),
        ("read_only", "The token of 'reader' is read-only"),
        ("foreign_namespace", "'someone-else/x' is not writable with this token"),
        ("refused_new", "Cannot write to 'scoped/x' (HTTP 403)"),
        ("refused_existing", "Cannot write to 'tester/groupvq-tiny' (HTTP 403)"),
    ],
)
def test_clear_error_when_the_repo_is_not_writable(published, hub, case, message):
    error = published["report"][case]
    assert error.startswith("push_to_hub: error: ") and message in error, error
    assert "scoped/x" not in hub.repos and "someone-else/x" not in hub.repos and "reader/x" not in hub.repos
    assert "hf_scoped" not in {token for method, path, token in hub.requests if path.endswith("/commit/main")}


# ------------------------------------------------------------------------------------------------ offline helpers
def _test_image():
    import numpy as np
    from PIL import Image

    return Image.fromarray((np.arange(40 * 48 * 3) % 251).astype(np.uint8).reshape(40, 48, 3))


def test_upload_file_list_keeps_out_training_state_pickles_and_tokens(tmp_path):
    for name in ("config.json", "model.safetensors", "modeling_groupvq.py", "README.md", "optimizer.bin",
                 "optimizer.safetensors", "scheduler.json", "random_states_0.pkl", "pytorch_model.bin", "model.pt",
                 "training_state_rank0.json",
                 "token", ".huggingface/token", "checkpoint-100/model.safetensors", "__pycache__/a.py",
                 ".git/config", "logs/events.out.tfevents.1"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"{}")
    assert upload_file_list(tmp_path) == ["README.md", "config.json", "model.safetensors", "modeling_groupvq.py"]


def test_check_no_secrets_refuses_tokens_and_pickles(tmp_path):
    (tmp_path / "config.json").write_text('{"hub_token": "hf_secret123"}')
    with pytest.raises(ValueError, match="contains the Hugging Face token"):
        check_no_secrets(tmp_path, ["config.json"], "hf_secret123")
    (tmp_path / "config.json").write_bytes(b"\x80\x04\x95" + b"\x00" * 8)
    with pytest.raises(ValueError, match="is a pickle"):
        check_no_secrets(tmp_path, ["config.json"], "hf_secret123")
    check_no_secrets(tmp_path, [], "hf_secret123")


def test_resolve_token_without_env_or_login(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
    with pytest.raises(LocalTokenNotFoundError, match="set the HF_TOKEN environment variable or log in"):
        resolve_token()
    (tmp_path / "token").write_text("hf_saved")
    assert resolve_token() == "hf_saved"
    assert resolve_token("hf_explicit") == "hf_explicit"


def test_publish_rejects_bad_arguments_before_any_request(local_model):
    with pytest.raises(ValueError, match="`resize_mode` must be 'extend' or 'resample'"):
        publish(local_model, "tester/x", token="hf_x", codebook_size=512, resize_mode="grow")
    with pytest.raises(ValueError, match="`repo_id`"):
        publish(local_model, "", token="hf_x")
    with pytest.raises(ValueError, match="no config.json in /nonexistent"):
        publish("/nonexistent", "tester/x", token="hf_x")


def test_card_for_heterogeneous_groups_and_flat_eval_results():
    config = GroupVQConfig.from_preset("tiny", group_sizes=[64, 64, 128], group_ranks=[8, 8, 16])
    card = render_model_card(config, "org/hetero", eval_results={"fid": 3.5, "psnr": 24.0, "dataset": "coco"},
                             training={"learning_rate": 1e-4, "dataset": "coco"})
    assert "| Codes per group n_j | 64, 64, 128 |" in card.text and "| Core rank r_j | 8, 8, 16 |" in card.text
    assert "| `learning_rate` | 0.0001 |" in card.text
    parsed = ModelCard(str(card))
    assert parsed.data.datasets == ["detection-datasets/coco"]
    assert {r.metric_type: r.metric_value for r in parsed.data.eval_results} == {"fid": 3.5, "psnr": 24.0}
    assert "No evaluation results" in render_model_card(config, "org/hetero").text
    # the evaluation set is not a training set; the demo photos are no Hub dataset
    assert ModelCard(str(render_model_card(config, "org/x", eval_results={"psnr": 20.0, "dataset": "imagenet"}))).data.datasets is None
    mixed = render_model_card(config, "org/x", training={"dataset": "imagenet-wds:0.6+coco:0.3+demo:0.1"})
    assert ModelCard(str(mixed)).data.datasets == ["timm/imagenet-1k-wds", "detection-datasets/coco"]


def test_eval_results_and_resize_study_inputs():
    assert normalize_eval_results({"results": {"PSNR": 20, "unknown": 1}})["metrics"] == {"psnr": 20.0}
    with pytest.raises(ValueError, match="holds none of the metrics"):
        normalize_eval_results({"accuracy": 0.5})
    with pytest.raises(ValueError, match="no such file"):
        normalize_eval_results("/nonexistent/results.json")
    assert normalize_eval_results({"psnr": float("inf"), "ssim": 1.0})["metrics"] == {"ssim": 1.0}  # identical images
    table = resize_study_markdown([{"size": 2, "rfid": 1.23456}])
    assert table == "| size | rfid |\n|---|---|\n| 2 | 1.235 |"
    with pytest.raises(ValueError, match="resize_study"):
        resize_study_markdown({"rows": []})


def test_load_for_publishing_converts_between_formats(tmp_path, local_model):
    from groupvq_hf.hub.publishing import load_for_publishing

    GroupVQVAE.from_groupvq(local_model).save_pretrained(tmp_path / "vae")
    local_model.save_pretrained(tmp_path / "model")
    as_model = load_for_publishing(tmp_path / "vae")
    as_vae = load_for_publishing(tmp_path / "model", diffusers=True)
    assert isinstance(as_model, GroupVQModel) and isinstance(as_vae, GroupVQVAE)
    reference = local_model.state_dict()
    assert all(torch.equal(value, reference[key]) for key, value in as_model.state_dict().items())
    assert all(torch.equal(value, reference[key.replace("quantize.", "quantizer.", 1)])
               for key, value in as_vae.state_dict().items())
    with pytest.raises(ValueError, match="no config.json"):
        load_for_publishing(tmp_path)
    with pytest.raises(ValueError, match="must be a GroupVQModel, a GroupVQVAE or a saved folder"):
        load_for_publishing(torch.nn.Linear(2, 2))


# ------------------------------------------------------------------------------------------------ network failures
NETWORK_TIMEOUT = 3  # the --timeout of these runs, in seconds


def _push_script(model_dir, endpoint, home, *args):
    """Run scripts/push_to_hub.py in a fresh process (HF_ENDPOINT is read at import); (exit code, output lines)."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "HF_HOME": str(home / "hf_home"),
        "HF_ENDPOINT": endpoint, "HF_TOKEN": "hf_writer", "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "NO_PROXY": "127.0.0.1,localhost",
        "PYTHONPATH": os.environ.get("PYTHONPATH", ""),  # the package under test when it is not the installed one
    }
    command = [sys.executable, SCRIPT, "--model", str(model_dir), "--timeout", str(NETWORK_TIMEOUT), *args]
    result = subprocess.run(command, env=env, cwd=home, capture_output=True, text=True, timeout=300)  # a hang fails
    return result.returncode, [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]


@pytest.fixture(scope="module")
def saved_model(local_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("network") / "model"
    local_model.save_pretrained(folder)
    return folder


def test_push_to_a_closed_port_ends_in_one_clear_line(saved_model, tmp_path):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
    code, lines = _push_script(saved_model, endpoint, tmp_path, "--repo_id", "tester/x")
    assert code == 1 and len(lines) == 1, lines
    assert lines[0].startswith(f"push_to_hub: error: cannot reach the Hub at {endpoint}: "), lines[0]
    assert "refused" in lines[0].lower()


def test_push_to_a_silent_port_ends_in_one_clear_line_after_the_timeout(saved_model, tmp_path):
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        code, lines = _push_script(saved_model, endpoint, tmp_path, "--repo_id", "tester/x")
    assert code == 1 and len(lines) == 1, lines
    assert lines[0].startswith(f"push_to_hub: error: the Hub at {endpoint} did not answer within {NETWORK_TIMEOUT} s"), lines[0]


@pytest.mark.parametrize("flag", ["--eval_results", "--training_args"])
def test_a_file_that_is_not_json_is_named_before_any_upload(saved_model, tmp_path, flag, monkeypatch):
    """The script's code in this process (`_push_script` runs it as a user does): the file is read before any
    request, which offline (`HF_HUB_OFFLINE=1`) would fail with another message."""
    from groupvq_hf.hub.cli import publish_main

    monkeypatch.setenv("HF_TOKEN", "hf_writer")
    not_json = tmp_path / "results.json"
    not_json.write_text("psnr: 24.1\n")  # YAML-ish, not JSON
    with pytest.raises(SystemExit) as exit_info:
        publish_main(["--model", str(saved_model), "--repo_id", "tester/x", flag, str(not_json)])
    message = str(exit_info.value.code)  # sys.exit(message): printed on stderr, exit code 1
    assert message.startswith(f"push_to_hub: error: `{flag[2:]}` file {str(not_json)!r} is not valid JSON: "), message
    assert "line 1 column 1" in message and "\n" not in message


def test_timeout_must_be_positive(saved_model, capsys):
    from groupvq_hf.hub.cli import publish_main

    for timeout in ("0", "nan"):
        with pytest.raises(SystemExit) as exit_info:
            publish_main(["--model", str(saved_model), "--repo_id", "tester/x", "--timeout", timeout])
        assert exit_info.value.code == 2
        assert f"--timeout must be a positive number of seconds, got {float(timeout)}" in capsys.readouterr().err


def test_an_upload_that_fails_midway_is_completed_by_a_rerun(hub, saved_model, tmp_path):
    hub.fail_next("POST", r"/api/models/tester/flaky/commit/main")  # the connection drops during the commit
    code, lines = _push_script(saved_model, hub.url, tmp_path, "--repo_id", "tester/flaky")
    assert code == 1 and len(lines) == 1, lines
    assert lines[0].startswith(f"push_to_hub: error: cannot reach the Hub at {hub.url}: "), lines[0]
    assert hub.files("tester/flaky") == {} and hub.repos["tester/flaky"].commits == []  # nothing half-uploaded
    code, lines = _push_script(saved_model, hub.url, tmp_path, "--repo_id", "tester/flaky")
    assert code == 0 and lines[-1].startswith("Published tester/flaky: "), lines
    assert set(hub.files("tester/flaky")) == TRANSFORMERS_FILES and len(hub.repos["tester/flaky"].commits) == 1


def test_network_failures_read_as_one_line_naming_the_endpoint(local_model):
    import httpx2

    from groupvq_hf.hub.publishing import network_failure

    request = httpx2.Request("GET", "http://hub.test/api/whoami-v2")
    refused = httpx2.ConnectError("[Errno 111] Connection\n   refused", request=request)
    assert network_failure(refused, "http://hub.test", 5) == (
        "cannot reach the Hub at http://hub.test: ConnectError: [Errno 111] Connection refused")
    dropped = httpx2.RemoteProtocolError("Server disconnected without sending a response.", request=request)
    assert network_failure(dropped, "http://hub.test", 5).startswith("cannot reach the Hub at http://hub.test: Remote")
    silent = network_failure(httpx2.ReadTimeout("timed out", request=request), "http://hub.test", 2.5)
    assert silent.startswith("the Hub at http://hub.test did not answer within 2.5 s (ReadTimeout)")
    assert network_failure(ValueError("not the network"), "http://hub.test", 5) is None
    with pytest.raises(ValueError, match="`timeout` must be a positive number of seconds"):
        publish(local_model, "tester/x", token="hf_x", timeout=0)


def test_script_reports_an_http_error_in_one_line(monkeypatch, saved_model):
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    import groupvq_hf.hub

    spec = importlib.util.spec_from_file_location("push_to_hub", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    response = httpx2.Response(503, request=httpx2.Request("POST", "http://hub.test/api/repos/create"))

    def unavailable(*args, **kwargs):
        raise HfHubHTTPError("503 Server Error: Service Unavailable\n\nRequest ID: abc", response=response)

    monkeypatch.setattr(groupvq_hf.hub.publishing, "publish", unavailable)
    with pytest.raises(SystemExit) as exit:
        script.main(["--model", str(saved_model), "--repo_id", "tester/x"])
    assert exit.value.code.startswith("push_to_hub: error: the Hub at ")
    assert exit.value.code.endswith(" answered: 503 Server Error: Service Unavailable Request ID: abc")


def test_publish_refuses_to_replace_a_folder_holding_other_files(tmp_path):
    from groupvq_hf.hub.publishing import check_replaceable

    check_replaceable(tmp_path / "new")  # absent: fine
    earlier = tmp_path / "earlier"  # what an earlier publish wrote: replaceable
    earlier.mkdir()
    for name in ("config.json", "model.safetensors", "README.md"):
        (earlier / name).write_text("{}")
    check_replaceable(earlier)
    training = tmp_path / "outputs"
    (training / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (training / "checkpoints" / "checkpoint-2" / "optimizer.bin").write_text("x")
    (training / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"save_directory.*checkpoints/checkpoint-2/optimizer.bin"):
        check_replaceable(training)
    assert (training / "checkpoints" / "checkpoint-2" / "optimizer.bin").is_file()


def test_hub_timeout_keeps_and_restores_the_clients_factory():
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils import _http

    from groupvq_hf.hub.publishing import hub_timeout

    made = []

    def users_factory():  # a proxy or certificate setup, say
        made.append(1)
        return _http.default_client_factory()

    set_client_factory(users_factory)
    try:
        with hub_timeout(5):
            client = _http._GLOBAL_CLIENT_FACTORY()
            assert made and client.timeout.read == 5
        assert _http._GLOBAL_CLIENT_FACTORY is users_factory
    finally:
        set_client_factory(_http.default_client_factory)


def test_push_in_offline_mode_ends_in_one_line(tmp_path):
    """A token is set but HF_HUB_OFFLINE=1 (as in these tests): one line saying so, exit code 1, no traceback."""
    GroupVQModel(GroupVQConfig.from_preset("tiny")).save_pretrained(tmp_path / "model")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_TOKEN="hf_anything")
    done = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "scripts", "push_to_hub.py"), "--model", str(tmp_path / "model"),
         "--repo_id", "tester/offline"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == (
        "push_to_hub: error: offline mode is on (HF_HUB_OFFLINE=1): unset it to upload."
    )
