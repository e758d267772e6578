"""groupvq_hf: the Group-VQ image tokenizer for transformers, diffusers and accelerate.

The model (the files that travel with a saved model as remote code) sits at the package root and is imported here;
the tooling lives in subpackages (`data`, `training`, `evaluation`, `hub`, `app`, `tokens`), whose public names listed
in `_LAZY` are importable from here too but are loaded on first use, so the root never imports a subpackage at import
time.
"""

import importlib

from transformers import AutoConfig, AutoImageProcessor, AutoModel

from .configuration_groupvq import PRESETS, GroupVQConfig
from .image_processing_groupvq import GroupVQImageProcessor
from .modeling_groupvq import (
    GroupVQEncoderOutput,
    GroupVQModel,
    GroupVQModelOutput,
    GroupVQPreTrainedModel,
)
from .quantizer import GroupVectorQuantizer, nearest_code_indices
from .vq_model import (
    GroupVQVAE,  # imported eagerly: diffusers resolves ["groupvq_hf.vq_model", ...] by module
)

__version__ = "0.1.0"

AutoConfig.register(GroupVQConfig.model_type, GroupVQConfig, exist_ok=True)
AutoModel.register(GroupVQConfig, GroupVQModel, exist_ok=True)
AutoImageProcessor.register(GroupVQConfig, image_processor_classes={"torchvision": GroupVQImageProcessor}, exist_ok=True)


# Public names of the subpackages, loaded on first use (PEP 562).
_LAZY = {
    "convert_simvq": "hub",
    "decode_tokens": "tokens",
    "from_simvq": "hub",
    "tokenize_dataset": "tokens",
}


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "GroupVQConfig",
    "GroupVQEncoderOutput",
    "GroupVQImageProcessor",
    "GroupVQModel",
    "GroupVQModelOutput",
    "GroupVQPreTrainedModel",
    "GroupVQVAE",
    "GroupVectorQuantizer",
    "PRESETS",
    "convert_simvq",
    "decode_tokens",
    "from_simvq",
    "nearest_code_indices",
    "tokenize_dataset",
]
