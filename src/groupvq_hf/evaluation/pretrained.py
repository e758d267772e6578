"""Pretrained feature networks for evaluation and the perceptual loss: LPIPS(VGG16) and Inception-v3 pool3, and
for SimVQ's evaluation protocol the ``lpips`` package's LPIPS (AlexNet, VGG16) and pytorch-fid's Inception-v3.

Both load the standard way when the weights are reachable (torchvision's VGG16 ImageNet weights, torch-fidelity's
FID Inception weights, fetched once through ``torch.hub`` and cached under ``torch.hub.get_dir()/checkpoints``) and
from a local file otherwise. With ``HF_HUB_OFFLINE=1`` (or ``TORCH_HUB_OFFLINE=1``) and no cached copy, nothing is
downloaded. With neither a cached/downloadable copy nor a local file, a ``FileNotFoundError`` names both ways out.

The networks themselves are the maintained implementations: torchmetrics' LPIPS module (which bundles the LPIPS
linear-layer weights, ``lpips_models/vgg.pth``) on a torchvision VGG16 ``features`` backbone, and torch-fidelity's
``FeatureExtractorInceptionV3`` (the TF-FID compatible Inception used by torch-fidelity and torchmetrics).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from unittest import mock

import torch
from torch import nn

from ..fileio import atomic_file

# torchvision's VGG16 ImageNet weights (``VGG16_Weights.IMAGENET1K_V1``), the backbone of LPIPS(VGG16).
VGG16_WEIGHTS_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
# LPIPS(VGG) cuts VGG16 ``features`` after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (slice1..slice5).
_VGG_SLICE_ENDS = (4, 9, 16, 23, 30)
INCEPTION_FEATURE = "2048"
INCEPTION_NAME = "inception-v3-compat"


def _offline() -> bool:
    return any(
        os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE") for k in ("HF_HUB_OFFLINE", "TORCH_HUB_OFFLINE")
    )


def _hub_state_dict(url: str, what: str, how_local: str) -> dict:
    """Load ``url`` through torch.hub's cache (download if allowed); otherwise raise an error naming both ways out."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    help_text = (
        f"{what} weights are needed but not available. Either (1) let them load the standard way: with network "
        f"access they are downloaded once from {url} and cached as {cached} (you can also place that file there "
        f"yourself), or (2) pass a local weights file: {how_local}."
    )
    if cached.is_file():
        return torch.load(cached, map_location="cpu", weights_only=True)
    if _offline():
        raise FileNotFoundError(
            help_text + " (Offline mode is on: HF_HUB_OFFLINE/TORCH_HUB_OFFLINE, so nothing was downloaded.)"
        )
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False, weights_only=True)
    except Exception as err:  # network, HTTP, or file-system failure: say how to get out of it
        raise FileNotFoundError(help_text + f" (Download failed: {err!r}.)") from err


def _load_file(path: str | os.PathLike, argument: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"`{argument}` must be an existing weights file, got {str(path)!r}.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # torch's message suggests weights_only=False: never here
        raise ValueError(
            f"`{argument}` {str(path)!r} holds pickled objects other than tensors and plain containers, which are "
            f"never unpickled here (torch.load weights_only=True runs no code). torch said: {str(error).splitlines()[0]}"
        ) from None
    if not isinstance(state, dict):
        raise ValueError(f"`{argument}` must hold a state dict (a dict of tensors), got {type(state).__name__}.")
    return state


# ------------------------------------------------------------------------------------------------------ LPIPS


def vgg16_features() -> nn.Sequential:
    """A randomly initialised torchvision VGG16 ``features`` stack (no 500 MB classifier is built)."""
    from torchvision.models.vgg import cfgs, make_layers

    features = make_layers(cfgs["D"], batch_norm=False)
    _kaiming_init(features)
    return features


def _kaiming_init(module: nn.Module) -> None:
    """torchvision's VGG init (He normal, zero bias): keeps random activations at unit scale, no denormals."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _lpips_key(key: str, slice_ends: tuple[int, ...] = _VGG_SLICE_ENDS, backbone: str = "VGG16") -> str | None:
    """Map a backbone (torchvision ``features``) / LPIPS state-dict key to the LPIPS module key (``None``: not part
    of LPIPS); ``slice_ends``: where each LPIPS slice of ``features`` ends."""
    if key.startswith(("net.slice", "lin")):
        return key
    if key.startswith(("classifier.", "scaling_layer.")):  # VGG classifier; LPIPS' constant input scaling
        return None
    parts = key.split(".")
    if parts[0] == "features":
        parts = parts[1:]
    if not parts or not parts[0].isdigit():
        raise ValueError(
            f"`weights` has an unexpected key {key!r}: expected torchvision {backbone} keys ('features.0.weight', "
            f"...), {backbone} features keys ('0.weight', ...) or LPIPS keys ('net.slice1.0.weight', "
            "'lin0.model.1.weight', ...)."
        )
    layer = int(parts[0])
    slice_id = next((s for s, end in enumerate(slice_ends, 1) if layer < end), None)
    if slice_id is None:
        return None
    return ".".join(["net", f"slice{slice_id}", *parts])


class FrozenNetwork(nn.Module):
    """A pretrained network wrapped as a measurement: parameters frozen, always in eval mode (``train()`` does not
    switch dropout or batch-norm updates on), still differentiable w.r.t. its inputs. Subclasses call ``freeze()``
    at the end of ``__init__``."""

    def freeze(self) -> FrozenNetwork:
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> FrozenNetwork:
        return super().train(False)


class LPIPSNetwork(FrozenNetwork):
    """LPIPS(VGG16) (Zhang et al., 2018): ``net(x, y)`` on images in [-1, 1] (N, 3, H, W) -> distances (N,).

    Frozen and always in eval mode (``train()`` does not switch dropout on), differentiable w.r.t. its inputs,
    so it serves both as the LPIPS metric and as the perceptual loss.
    """

    def __init__(self, lpips: nn.Module):
        super().__init__()
        self.lpips = lpips
        self.freeze()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(
                f"LPIPS inputs must both be (N, 3, H, W) in [-1, 1], got {tuple(x.shape)} and {tuple(y.shape)}."
            )
        return self.lpips(x, y).flatten()


def lpips_network(weights: str | os.PathLike | None = None) -> LPIPSNetwork:
    """LPIPS with a VGG16 backbone, frozen, in eval mode.

    ``weights=None`` loads torchvision's VGG16 ImageNet weights the standard way (torch.hub cache, download when
    online). ``weights=PATH`` reads a ``torch.save``-d state dict instead, in any of these key layouts:

    - torchvision VGG16 (``features.0.weight``, ...; ``classifier.*`` is ignored), e.g. ``vgg16-397923af.pth``;
    - VGG16 ``features`` only (``0.weight``, ...), what [`save_lpips_weights`] writes (~58 MB in fp32);
    - a full LPIPS state dict (``net.slice1.0.weight``, ..., ``lin0.model.1.weight``, ...), as torchmetrics' or the
      ``lpips`` package's LPIPS modules hold.

    The LPIPS linear layers come from the file when it has them, otherwise from the copy bundled with torchmetrics.
    Every backbone weight must be present (missing ones raise ValueError).
    """
    from torchmetrics.functional.image import lpips as tm_lpips

    if weights is None:
        state = _hub_state_dict(
            VGG16_WEIGHTS_URL,
            "LPIPS(VGG16) backbone (torchvision VGG16 ImageNet)",
            "`lpips_network(weights=PATH)` / `--lpips_weights PATH` with a VGG16 state dict such as "
            "vgg16-397923af.pth (see `groupvq_hf.evaluation.save_lpips_weights`)",
        )
    else:
        state = _load_file(weights, "weights")
    # torchmetrics builds a full torchvision VGG16 for its backbone; hand it the features stack only.
    with mock.patch.object(tm_lpips, "_get_tv_model_features", lambda net, pretrained=False: vgg16_features()):
        module = tm_lpips._LPIPS(pretrained=True, net="vgg", pnet_rand=True)  # bundled LPIPS linear layers
    _load_lpips_state(module, state, _VGG_SLICE_ENDS, "VGG16")
    return LPIPSNetwork(module)


def _load_lpips_state(module: nn.Module, state: dict, slice_ends: tuple[int, ...], backbone: str) -> None:
    """Load a backbone / LPIPS ``state`` (keys mapped by `_lpips_key`) into an LPIPS ``module`` (torchmetrics' or the
    ``lpips`` package's: same layout); its linear layers stay the bundled ones where ``state`` has none."""
    mapped = {}
    for key, value in state.items():
        new_key = _lpips_key(key, slice_ends, backbone)
        if new_key is not None:
            mapped[new_key] = value
    # Each linear layer is registered twice (``lin0`` and ``lins.0``, one shared module): load ``lin<i>``, taking
    # ``lins.<i>`` only where the file has no ``lin<i>``.
    for key in [k for k in mapped if k.startswith("lins.")]:
        value = mapped.pop(key)
        index, rest = key[len("lins.") :].split(".", 1)
        mapped.setdefault(f"lin{index}.{rest}", value)
    expected_backbone = {k for k in module.state_dict() if k.startswith("net.")}
    missing = sorted(expected_backbone - mapped.keys())
    if missing:
        raise ValueError(
            f"`weights` lacks {len(missing)} {backbone} backbone tensors (first: {missing[:3]}); "
            f"expected a {backbone} (features) or LPIPS state dict."
        )
    unexpected = sorted(set(mapped) - set(module.state_dict()))
    if unexpected:
        raise ValueError(f"`weights` has keys that are not part of LPIPS({backbone}): {unexpected[:5]}.")
    module.load_state_dict(mapped, strict=False)


def _save_file(state: dict, path: str | os.PathLike) -> Path:
    """``torch.save`` of a state dict to ``path`` (its folder made), atomically: the one writer of the weights files
    that `_load_file` reads back with ``weights_only=True``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        torch.save(state, tmp)
    return path


def save_lpips_weights(
    path: str | os.PathLike, network: nn.Module | None = None, dtype: torch.dtype | None = None
) -> Path:
    """Write a weights file that [`lpips_network`] (and [`lpips_package_network`]) reads offline; returns its path.

    ``network`` may be an [`LPIPSNetwork`] (writes the backbone features and the LPIPS linear layers), a VGG16 or
    AlexNet / its ``features`` stack, or ``None`` for randomly initialised VGG16 features (for tests). ``dtype`` (e.g.
    ``torch.float16``) shrinks the file; values are cast back to float32 on load.
    """
    if network is None:
        network = vgg16_features()
    if isinstance(network, LPIPSNetwork):
        state = {
            k: v
            for k, v in network.lpips.state_dict().items()
            if k.startswith(("net.", "lin")) and not k.startswith("lins.")
        }
    else:
        state = network.state_dict()
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    return _save_file(state, path)


# ------------------------------------------------------------------------ the `lpips` package (SimVQ protocol)

# torchvision's AlexNet ImageNet weights (``AlexNet_Weights.IMAGENET1K_V1``), the backbone of LPIPS(AlexNet).
ALEXNET_WEIGHTS_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"
# Backbone weights and the ``features`` index where each of the five LPIPS slices ends, per ``lpips`` network.
LPIPS_BACKBONES = {"alex": (ALEXNET_WEIGHTS_URL, (2, 5, 8, 10, 12)), "vgg": (VGG16_WEIGHTS_URL, _VGG_SLICE_ENDS)}


def lpips_package_network(net: str = "vgg", weights: str | os.PathLike | None = None) -> LPIPSNetwork:
    """The ``lpips`` package's ``LPIPS(net=net)`` (AlexNet or VGG16 backbone, the package's bundled linear
    layers, version 0.1), frozen, in eval mode: what SimVQ's evaluation.py builds. ``net(x, y)`` on images in
    [-1, 1] -> distances (N,).

    The package itself would download torchvision's ImageNet backbone; here the backbone comes from torch hub's
    cache (``weights=None``: ``alexnet-owt-7be5be79.pth`` / ``vgg16-397923af.pth``, downloaded once when online)
    or from ``weights=PATH`` in the key layouts [`lpips_network`] reads (torchvision, ``features`` only, LPIPS).
    """
    import lpips

    if net not in LPIPS_BACKBONES:
        raise ValueError(f"`net` must be one of {sorted(LPIPS_BACKBONES)}, got {net!r}.")
    url, slice_ends = LPIPS_BACKBONES[net]
    if weights is None:
        flag = "--lpips_alex_weights" if net == "alex" else "--lpips_weights"
        state = _hub_state_dict(
            url, f"LPIPS({net}) backbone (torchvision ImageNet)",
            f"`lpips_package_network({net!r}, weights=PATH)` / `{flag} PATH` with a torchvision state dict such as "
            f"{os.path.basename(url)} (see `groupvq_hf.evaluation.save_lpips_weights`)",
        )  # fmt: skip
    else:
        state = _load_file(weights, "weights")
    module = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)  # random backbone (no download), bundled lin layers
    _load_lpips_state(module, state, slice_ends, net)
    return LPIPSNetwork(module)


# -------------------------------------------------------------------- pytorch-fid's Inception (SimVQ protocol)


class FIDInceptionFeatures(FrozenNetwork):
    """pytorch-fid's ``InceptionV3`` (the 2048-d pool3 block, FID weights): float images (N, 3, H, W) in [0, 1]
    -> features (N, 2048), float32. It resizes to 299 (bilinear) and maps to [-1, 1] itself, as in SimVQ's
    evaluation.py. ``num_features`` lets torchmetrics' FID state use it directly."""

    num_features = 2048

    def __init__(self, inception: nn.Module):
        super().__init__()
        self.inception = inception
        self.freeze()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not images.is_floating_point() or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                f"pytorch-fid Inception inputs must be float images (N, 3, H, W) in [0, 1], got {images.dtype} "
                f"{tuple(images.shape)}."
            )
        (features,) = self.inception(images)
        return features.reshape(images.shape[0], -1).float()


def _pytorch_fid_inception(state: dict | None) -> nn.Module:
    """pytorch-fid's ``InceptionV3([3])`` with ``state`` as its FID weights (``None``: its random init kept)."""
    from pytorch_fid import inception as fid
    from torchvision.models import Inception3

    # pytorch-fid fetches FID_WEIGHTS_URL itself; hand it ``state`` instead.
    with mock.patch.object(fid, "load_state_dict_from_url", lambda *args, **kwargs: state):
        if state is not None:
            return fid.InceptionV3([fid.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
        with mock.patch.object(Inception3, "load_state_dict", lambda self, *args, **kwargs: None):
            return fid.InceptionV3([fid.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])


def pytorch_fid_inception_network(weights: str | os.PathLike | None = None) -> FIDInceptionFeatures:
    """pytorch-fid's FID Inception-v3 (2048-d pool3 features). ``weights=None`` reads pytorch-fid's
    ``pt_inception-2015-12-05-6726825d.pth`` from torch hub's cache (downloaded once when online), where
    pytorch-fid itself would look; ``weights=PATH`` reads that state dict (or one of
    [`save_pytorch_fid_inception_weights`]) from a file."""
    from pytorch_fid.inception import FID_WEIGHTS_URL

    if weights is None:
        state = _hub_state_dict(
            FID_WEIGHTS_URL, "FID Inception-v3 (pytorch-fid)",
            "`pytorch_fid_inception_network(weights=PATH)` / `--inception_weights PATH` (protocol simvq) with "
            "pytorch-fid's pt_inception-2015-12-05-6726825d.pth",
        )  # fmt: skip
    else:
        state = _load_file(weights, "weights")
    try:
        return FIDInceptionFeatures(_pytorch_fid_inception(state))
    except RuntimeError as err:
        raise ValueError(f"`weights` is not a pytorch-fid FID Inception-v3 state dict: {err}") from err


def save_pytorch_fid_inception_weights(
    path: str | os.PathLike, dtype: torch.dtype | None = None, seed: int = 0
) -> Path:
    """Write random weights of pytorch-fid's FID Inception-v3, in the key layout of its weights file (tests)."""
    from pytorch_fid import inception as fid
    from torchvision.models import Inception3

    built = []
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        with mock.patch.object(fid, "load_state_dict_from_url", lambda *args, **kwargs: {}), mock.patch.object(
            Inception3, "load_state_dict", lambda self, *args, **kwargs: built.append(self)
        ):
            fid.fid_inception_v3()
        _kaiming_init(built[0])
    state = built[0].state_dict()
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return _save_file(state, path)


# -------------------------------------------------------------------------------------------------- Inception


class InceptionFeatures(FrozenNetwork):
    """torch-fidelity's FID Inception-v3: uint8 images (N, 3, H, W) -> 2048-d pool3 features (N, 2048), float32.

    Images are resized to 299 inside (TF1-compatible bilinear), exactly as torch-fidelity computes FID.
    ``num_features`` lets torchmetrics' ``FrechetInceptionDistance(feature=...)`` use it directly.
    """

    num_features = 2048

    def __init__(self, extractor: nn.Module):
        super().__init__()
        self.extractor = extractor
        self.freeze()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                f"Inception inputs must be uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}."
            )
        (features,) = self.extractor(images)
        return features.reshape(images.shape[0], -1).float()


def _fidelity_inception(state: dict | None) -> nn.Module:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Inception(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, *args, **kwargs):  # we pass the state dict in ourselves
            if state is None:
                return None
            return super().load_state_dict(state, *args, **kwargs)

    # torch-fidelity fetches its weights itself; hand it nothing to fetch and load ``state`` in its place.
    with mock.patch("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", lambda *a, **k: {}):
        return _Inception(INCEPTION_NAME, [INCEPTION_FEATURE], feature_extractor_weights_path=None)


def inception_network(weights: str | os.PathLike | None = None) -> InceptionFeatures:
    """The 2048-d pool3 Inception-v3 feature extractor of FID (torch-fidelity's ``inception-v3-compat``).

    ``weights=None`` loads torch-fidelity's converted TF Inception weights the standard way (torch.hub cache,
    download when online); ``weights=PATH`` reads a local state dict of ``FeatureExtractorInceptionV3``
    (e.g. ``weights-inception-2015-12-05-6726825d.pth``, or one written by [`save_inception_weights`]).
    """
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    if weights is None:
        state = _hub_state_dict(
            URL_INCEPTION_V3,
            "FID Inception-v3 (torch-fidelity)",
            "`inception_network(weights=PATH)` / `--inception_weights PATH` with a FeatureExtractorInceptionV3 state "
            "dict such as weights-inception-2015-12-05-6726825d.pth",
        )
    else:
        state = _load_file(weights, "weights")
    try:
        extractor = _fidelity_inception(state)
    except RuntimeError as err:
        raise ValueError(f"`weights` is not a torch-fidelity Inception-v3 state dict: {err}") from err
    return InceptionFeatures(extractor)


def save_inception_weights(
    path: str | os.PathLike, network: nn.Module | None = None, dtype: torch.dtype | None = None, seed: int = 0
) -> Path:
    """Write an Inception weights file for [`inception_network`]; ``network=None`` writes random weights (tests).

    ``dtype=torch.float16`` halves the file (~48 MB); values are cast back to float32 on load.
    """
    if network is None:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            network = _fidelity_inception(None)
            _kaiming_init(network)
    if isinstance(network, InceptionFeatures):
        network = network.extractor
    state = network.state_dict()
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return _save_file(state, path)


__all__ = [
    "FrozenNetwork",
    "ALEXNET_WEIGHTS_URL",
    "FIDInceptionFeatures",
    "LPIPS_BACKBONES",
    "lpips_package_network",
    "pytorch_fid_inception_network",
    "save_pytorch_fid_inception_weights",
    "INCEPTION_FEATURE",
    "INCEPTION_NAME",
    "InceptionFeatures",
    "LPIPSNetwork",
    "VGG16_WEIGHTS_URL",
    "inception_network",
    "lpips_network",
    "save_inception_weights",
    "save_lpips_weights",
    "vgg16_features",
]
