"""Shared test setup: fully offline, tiny models."""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# datasets' cache (and the data-file records of local folders in it) per test run, not the user's: pytest-xdist's
# workers inherit the controller's (records are keyed by folder, written under a file lock)
SESSION_DATASETS_CACHE = None if "HF_DATASETS_CACHE" in os.environ else tempfile.mkdtemp(prefix="groupvq-datasets-")
if SESSION_DATASETS_CACHE:
    os.environ["HF_DATASETS_CACHE"] = SESSION_DATASETS_CACHE

import pytest  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def tiny_config():
    from groupvq_hf import GroupVQConfig

    return GroupVQConfig.from_preset("tiny")


@pytest.fixture
def tiny_model(tiny_config):
    from groupvq_hf import GroupVQModel

    torch.manual_seed(0)
    return GroupVQModel(tiny_config).eval()


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A tiny untrained GroupVQModel (seed 0) saved with its image processor; a test module may define its own."""
    from groupvq_hf import GroupVQConfig, GroupVQModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny-groupvq"
    GroupVQModel(GroupVQConfig.from_preset("tiny")).eval().save_pretrained(path)
    return path


@pytest.fixture
def pixels():
    generator = torch.Generator().manual_seed(0)
    return torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1


def reset_accelerate_state():
    """Forget accelerate's process-wide state (AcceleratorState, GradientState, PartialState), so that the next
    `Accelerator` (or training run in this process) starts afresh and none is left behind for other tests."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    for state in (AcceleratorState, GradientState, PartialState):
        state._reset_state()


def train_in_process(argv: list[str]) -> dict:
    """One run of scripts/train.py's code in this process: a fresh accelerate state before and after, one torch
    thread (tiny convolutions: fastest, and immune to a busy machine)."""
    from groupvq_hf.training import main

    reset_accelerate_state()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(argv)
    finally:
        torch.set_num_threads(threads)
        reset_accelerate_state()


@pytest.fixture
def fresh_accelerate_state():
    """A fresh accelerate state for the test, reset again after it; yields the reset function for resets within."""
    reset_accelerate_state()
    yield reset_accelerate_state
    reset_accelerate_state()


# ------------------------------------------------------------------------- tiny GroupVQVAE / GroupVQModel (test_vq_model*)
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
    from groupvq_hf import GroupVQVAE

    torch.manual_seed(seed)
    return GroupVQVAE(**{**TINY, **overrides}).eval()


def tiny_groupvq_model(seed=0, **overrides):
    from groupvq_hf import GroupVQConfig, GroupVQModel

    torch.manual_seed(seed)
    small = {"block_out_channels": (8, 16), "norm_num_groups": 8, "latent_channels": 8, "sample_size": 16}
    config = GroupVQConfig.from_preset("tiny", **{**small, **overrides})
    return GroupVQModel(config).eval()


from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402


class ReadBacks(TorchDispatchMode):
    """Records the ops that, on a GPU, make the host wait for the device: a value read back (``.item()``,
    ``bool(t)``), ``bincount`` (reads its largest index), ``nonzero`` and boolean-mask indexing (read their size)."""

    WAITING = {"aten::_local_scalar_dense", "aten::bincount", "aten::nonzero", "aten::masked_select", "aten::unique_dim",
               "aten::_unique2"}  # fmt: skip

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        masked = name == "aten::index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else [])
        )
        if name in self.WAITING or masked:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def pytest_sessionfinish(session, exitstatus):
    if SESSION_DATASETS_CACHE:
        import shutil

        shutil.rmtree(SESSION_DATASETS_CACHE, ignore_errors=True)
