"""groupvq_hf: the Group-VQ image tokenizer for transformers, diffusers and accelerate."""

from transformers import AutoConfig, AutoImageProcessor, AutoModel

from .configuration_groupvq import PRESETS, GroupVQConfig
from .convert_simvq import convert_simvq, from_simvq
from .image_processing_groupvq import GroupVQImageProcessor
from .modeling_groupvq import GroupVQEncoderOutput, GroupVQModel, GroupVQModelOutput, GroupVQPreTrainedModel
from .quantizer import GroupVectorQuantizer, nearest_code_indices
from .vq_model import GroupVQVAE  # imported eagerly: diffusers resolves ["groupvq_hf.vq_model", ...] by module

__version__ = "0.1.0"

AutoConfig.register(GroupVQConfig.model_type, GroupVQConfig, exist_ok=True)
AutoModel.register(GroupVQConfig, GroupVQModel, exist_ok=True)
AutoImageProcessor.register(GroupVQConfig, image_processor_classes={"torchvision": GroupVQImageProcessor}, exist_ok=True)


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
    "from_simvq",
    "nearest_code_indices",
]
