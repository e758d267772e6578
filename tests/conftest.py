"""Shared test setup: fully offline, tiny models."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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


@pytest.fixture
def pixels():
    generator = torch.Generator().manual_seed(0)
    return torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1
