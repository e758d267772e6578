"""Image processor of the Group-VQ tokenizer: resize, center crop, scale to [-1, 1]; `postprocess` back."""

from __future__ import annotations

import torch
from PIL import Image
from transformers.image_processing_backends import TorchvisionBackend
from transformers.image_utils import PILImageResampling


def to_uint8(unit_images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] (any float dtype and layout) -> uint8 of the same layout, rounded as when saving an image:
    the one [0, 1] -> [0, 255] conversion of the package (postprocessing, rFID inputs, the demo page, grids)."""
    return (unit_images * 255).round().clamp(0, 255).to(torch.uint8)


class GroupVQImageProcessor(TorchvisionBackend):
    """Shorter side resized to `size["shortest_edge"]`, center crop to `crop_size`, pixels mapped to [-1, 1].

    Defaults follow the paper's 128x128 ImageNet protocol. `postprocess` maps model outputs back to images.
    """

    model_input_names = ["pixel_values"]
    resample = PILImageResampling.BICUBIC
    size = {"shortest_edge": 128}
    crop_size = {"height": 128, "width": 128}
    image_mean = [0.5, 0.5, 0.5]
    image_std = [0.5, 0.5, 0.5]
    do_resize = True
    do_center_crop = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True

    @classmethod
    def for_resolution(cls, side: int) -> "GroupVQImageProcessor":
        """The processor of a model trained at `side` x `side`: shorter side to `side`, center crop `side` x `side`."""
        return cls(size={"shortest_edge": side}, crop_size={"height": side, "width": side})

    def postprocess(self, images: torch.Tensor, output_type: str = "pil"):
        """Map model outputs (B, 3, H, W) in [-1, 1] to `"pil"` images, `"np"` uint8 (B, H, W, 3) or `"pt"` [0, 1]."""
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"`output_type` must be 'pil', 'np' or 'pt', got {output_type!r}.")
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            raise ValueError(f"`images` must be a tensor of shape (batch, channels, H, W), got {getattr(images, 'shape', type(images))}.")
        std = torch.tensor(self.image_std, dtype=torch.float32).view(1, -1, 1, 1)
        mean = torch.tensor(self.image_mean, dtype=torch.float32).view(1, -1, 1, 1)
        images = (images.detach().float().cpu() * std + mean).clamp(0, 1)
        if output_type == "pt":
            return images
        array = to_uint8(images.permute(0, 2, 3, 1)).numpy()
        if output_type == "np":
            return array
        return [Image.fromarray(a.squeeze(-1) if a.shape[-1] == 1 else a) for a in array]


GroupVQImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = ["GroupVQImageProcessor", "to_uint8"]
