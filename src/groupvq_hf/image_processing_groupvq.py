"""Image processor of the Group-VQ tokenizer: resize, center crop, scale to [-1, 1]; `postprocess` back."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_backends import TorchvisionBackend
from transformers.image_utils import PILImageResampling


def to_uint8(unit_images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] (any float dtype and layout) -> uint8 of the same layout, rounded as when saving an image:
    the one [0, 1] -> [0, 255] conversion of the package (postprocessing, rFID inputs, the demo page, grids)."""
    return (unit_images * 255).round().clamp(0, 255).to(torch.uint8)


HIGH_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "F")  # PIL's 16/32-bit integer and float single-channel modes


def to_rgb(image: Image.Image) -> tuple[Image.Image, str | None]:
    """Convert any PIL mode to RGB. Returns the image and the original mode when a conversion was needed.

    Alpha (and a palette's transparent colour) is composited on white; 16/32-bit and float images are rescaled to 8
    bits by their own maximum (PIL's own conversion clips them at 255, which saturates a 16-bit photo). The one
    RGB rule of the package: `GroupVQImageProcessor` and the data stream both apply it.
    """
    mode = image.mode
    if mode == "RGB":
        return image, None
    if mode in HIGH_BIT_MODES:
        array = np.asarray(image, dtype=np.float64)
        peak = array.max() if array.size and array.max() > 0 else 1.0
        image = Image.fromarray(np.clip(array / peak * 255.0, 0, 255).astype(np.uint8))
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB"), mode


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

    def process_image(self, image, do_convert_rgb: bool | None = None, *args, **kwargs) -> torch.Tensor:
        """transformers' per-image step, with PIL images converted to RGB by `to_rgb` (16-bit and float images
        rescaled by their maximum), so ``processor(image)`` sees the pixels the training and tokens streams see."""
        if isinstance(image, Image.Image) and (self.do_convert_rgb if do_convert_rgb is None else do_convert_rgb):
            image = to_rgb(image)[0]
        return super().process_image(image, do_convert_rgb, *args, **kwargs)

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

__all__ = ["GroupVQImageProcessor", "to_rgb", "to_uint8"]
