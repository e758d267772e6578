"""The VQGAN training objective of the paper's baseline (SimVQ / VQGAN, Esser et al. 2021), with Group-VQ's loss.

generator:      L1(x, x_rec) + w_p * LPIPS(x, x_rec) + w_c * L_commit + w_d * lambda * [step >= disc_start] * L_G
discriminator:  [step >= disc_start] * hinge(D(x), D(x_rec))

``L_commit`` is the quantizer's ``beta * ||z - sg(q)||^2 + ||sg(z) - q||^2`` (paper Eq. 3 without its
reconstruction term, which is the L1 here). The default is SimVQ's released recipe (``VQLPIPSWithDiscriminator``
with ``gen_loss_weight: 0.1`` in ``configs/imagenet_simvq_128_B.yaml``): the non-saturating generator loss
``L_G = mean_b softplus(-mean_patches D(x_rec)_b)`` (logits averaged per image first) with a fixed weight
``w_d = 0.1`` (``lambda = 1``). The alternatives of taming-transformers stay available: the hinge generator loss
``L_G = -mean D(x_rec)`` and the adaptive weight ``lambda = ||grad_last L_rec|| / (||grad_last L_G|| + 1e-4)``
taken at the decoder's last layer (Esser et al., Eq. 7).
The discriminator is the PatchGAN of pix2pix / taming-transformers (``NLayerDiscriminator``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchGANDiscriminator(nn.Module):
    """PatchGAN discriminator (Isola et al. 2017), as used by VQGAN: ``num_layers`` strided 4x4 convolutions with
    BatchNorm and LeakyReLU(0.2), then a stride-1 block and a 1-channel conv. Returns per-patch logits (B, 1, h, w).

    Initialised as in taming-transformers: conv weights N(0, 0.02), norm weights N(1, 0.02), norm biases 0.
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("base_channels", base_channels), ("num_layers", num_layers)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
        self.in_channels, self.base_channels, self.num_layers = in_channels, base_channels, num_layers
        layers: list[nn.Module] = [nn.Conv2d(in_channels, base_channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, num_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < num_layers else 1
            layers += [
                nn.Conv2d(base_channels * prev, base_channels * mult, 4, stride, 1, bias=False),
                nn.BatchNorm2d(base_channels * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(base_channels * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.main(pixel_values)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the discriminator: ``(mean relu(1 - D(x)) + mean relu(1 + D(x_rec))) / 2``."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator side of the hinge GAN: ``-mean D(x_rec)``."""
    return -logits_fake.mean()


def non_saturating_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """SimVQ's non-saturating generator loss: ``mean_b softplus(-m_b)`` with ``m_b`` the mean logit of image ``b``
    over its patches (``non_saturate_gen_loss``: sigmoid cross-entropy with label 1 of the per-image mean logit)."""
    per_image = logits_fake.reshape(logits_fake.shape[0], -1).mean(dim=1)
    return F.softplus(-per_image).mean()


GENERATOR_LOSSES = {"non_saturating": non_saturating_g_loss, "hinge": hinge_g_loss}


def adaptive_generator_weight(
    rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4
) -> torch.Tensor:
    """VQGAN's adaptive weight (Esser et al. 2021, Eq. 7): ``||grad rec|| / (||grad g|| + 1e-4)`` at ``last_layer``,
    clamped to [0, max_weight] and detached. Both losses must still hold their graphs (they are retained)."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.float().norm() / (g_grad.float().norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


class VQGANLoss(nn.Module):
    """The objective above. ``perceptual`` is a frozen network ``net(x, y) -> (N,)`` on [-1, 1] images (LPIPS,
    see ``groupvq_hf.evaluation.lpips_network``); it is required when ``perceptual_weight > 0``.

    Defaults are SimVQ's recipe: ``generator_loss="non_saturating"`` with the fixed ``disc_weight=0.1``.
    ``generator_loss="hinge"`` and ``adaptive_weight=True`` (``disc_weight`` then multiplies the adaptive weight,
    taming-transformers' ``disc_weight``) give the VQGAN variants."""

    def __init__(
        self,
        perceptual: nn.Module | None = None,
        perceptual_weight: float = 1.0,
        disc_weight: float = 0.1,
        disc_start: int = 0,
        commitment_weight: float = 1.0,
        adaptive_weight: bool = False,
        generator_loss: str = "non_saturating",
    ):
        super().__init__()
        for name, value in (
            ("perceptual_weight", perceptual_weight), ("disc_weight", disc_weight),
            ("disc_start", disc_start), ("commitment_weight", commitment_weight),
        ):  # fmt: skip
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"`{name}` must be a non-negative number, got {value!r}.")
        if generator_loss not in GENERATOR_LOSSES:
            raise ValueError(f"`generator_loss` must be one of {sorted(GENERATOR_LOSSES)}, got {generator_loss!r}.")
        if perceptual_weight > 0 and perceptual is None:
            raise ValueError(
                "`perceptual` (an LPIPS network) is required when `perceptual_weight` > 0; pass one or set 0."
            )
        self.perceptual = perceptual if perceptual_weight > 0 else None
        self.perceptual_weight = float(perceptual_weight)
        self.disc_weight = float(disc_weight)
        self.disc_start = int(disc_start)
        self.commitment_weight = float(commitment_weight)
        self.adaptive_weight = bool(adaptive_weight)
        self.generator_loss_name = generator_loss
        self.generator_gan_loss = GENERATOR_LOSSES[generator_loss]

    def discriminator_active(self, step: int) -> bool:
        """Whether the GAN terms are on at ``step`` (``step >= disc_start`` and ``disc_weight > 0``)."""
        return self.disc_weight > 0 and step >= self.disc_start

    def reconstruction_loss(self, pixels: torch.Tensor, reconstruction: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """``L1 + w_p * LPIPS`` (means over the batch) and its parts for logging."""
        l1 = (pixels.float() - reconstruction.float()).abs().mean()
        logs = {"l1": l1.detach()}
        loss = l1
        if self.perceptual is not None:
            perceptual = self.perceptual(pixels.float(), reconstruction.float()).mean()
            logs["perceptual"] = perceptual.detach()
            loss = loss + self.perceptual_weight * perceptual
        return loss, logs

    def generator_loss(
        self,
        pixels: torch.Tensor,
        reconstruction: torch.Tensor,
        commitment_loss: torch.Tensor,
        step: int,
        discriminator: nn.Module | None = None,
        last_layer: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict]:
        """The generator's total loss and a dict of detached parts (l1, perceptual, commitment, g_loss, d_weight)."""
        rec_loss, logs = self.reconstruction_loss(pixels, reconstruction)
        loss = rec_loss + self.commitment_weight * commitment_loss.float()
        logs["commitment"] = commitment_loss.detach().float()
        if discriminator is not None and self.discriminator_active(step):
            g_loss = self.generator_gan_loss(discriminator(reconstruction.contiguous()).float())
            if self.adaptive_weight and last_layer is not None and torch.is_grad_enabled():
                d_weight = adaptive_generator_weight(rec_loss, g_loss, last_layer)
            else:
                d_weight = torch.ones((), device=rec_loss.device)
            loss = loss + self.disc_weight * d_weight * g_loss
            logs.update(g_loss=g_loss.detach(), d_weight=d_weight)
        logs["loss"] = loss.detach()
        return loss, logs

    def discriminator_loss(
        self, discriminator: nn.Module, pixels: torch.Tensor, reconstruction: torch.Tensor
    ) -> tuple[torch.Tensor, dict]:
        """Hinge loss of ``discriminator`` on real ``pixels`` and detached ``reconstruction``."""
        logits_real = discriminator(pixels.contiguous().detach()).float()
        logits_fake = discriminator(reconstruction.contiguous().detach()).float()
        loss = hinge_d_loss(logits_real, logits_fake)
        return loss, {
            "d_loss": loss.detach(),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }


__all__ = [
    "GENERATOR_LOSSES",
    "PatchGANDiscriminator",
    "VQGANLoss",
    "adaptive_generator_weight",
    "hinge_d_loss",
    "hinge_g_loss",
    "non_saturating_g_loss",
]
