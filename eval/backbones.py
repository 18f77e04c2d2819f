"""FID, KID and LPIPS on face crops, with backbone weights only from paths the user gives.

Nothing is downloaded. FID and KID use torchmetrics with a custom feature extractor: torchvision's Inception-v3
architecture (2048-d pool features) loaded from the user's torchvision ImageNet weights
(``inception_v3_google-0cc3c7bd.pth``). torch-fidelity's TF-ported Inception, which published FIDs use, is not
involved, so numbers are comparable between methods here, not with FIDs in papers. LPIPS uses the ``lpips``
package's calibrated linear heads (shipped with it) on a trunk loaded from the user's torchvision AlexNet/VGG weights
(``criteria.lpips_loss.LPIPSLoss``).

Without a weights path the metric is not computed: its value is the string ``unavailable (no weights: pass
--inception_weights PATH)`` (or ``--lpips_weights``), never a number.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from criteria.lpips_loss import LPIPSLoss
from keepr.errors import KeeprError
from keepr.registry import missing, where
from keepr.weights import read_state_dict

UNAVAILABLE_INCEPTION = "unavailable (no weights: pass --inception_weights PATH)"
UNAVAILABLE_LPIPS = "unavailable (no weights: pass --lpips_weights PATH)"


class InceptionFeatures(nn.Module):
    """torchvision Inception-v3 up to the 2048-d average pool, for torchmetrics FID/KID.

    Takes uint8 RGB NCHW (any size; resized to 299 bilinearly) and returns float [N, 2048].
    """

    num_features = 2048

    def __init__(self, weights_path: str | None = None):  # torchvision ImageNet weights file (required)
        super().__init__()
        from torchvision.models import inception_v3  # heavy (torchvision): only in __init__()

        if not weights_path:
            raise KeeprError("Inception weights needed for FID/KID: pass --inception_weights PATH "
                             f"(get it from: {where('inception')})")
        path = Path(weights_path)
        if not path.is_file():
            raise missing("inception", path)
        net = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=False)
        state = read_state_dict(path, "Inception-v3")
        try:
            net.load_state_dict(state)
        except RuntimeError as exc:
            raise KeeprError(f"{path}: not torchvision Inception-v3 weights ({str(exc).splitlines()[0]})") from None
        net.fc = nn.Identity()
        net.AuxLogits = None
        net.aux_logits = False
        self.net = net.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def train(self, mode: bool = True):  # always frozen
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected [N,3,H,W] images, got {tuple(images.shape)}")
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False, antialias=True)
        x = (x - self.mean) / self.std
        return self.net(x)


def _to_nchw_uint8(crops) -> torch.Tensor:
    arr = np.asarray(crops)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 [N,H,W,3] crops, got {arr.dtype} {arr.shape}")
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).contiguous()


class ImageQuality:
    """Accumulates (original, anonymized) face crops and reports FID, KID and LPIPS, or why they are unavailable.

    inception_weights / lpips_weights: user paths; None makes the matching metric "unavailable (...)".
    kid_subset_size: KID's subset size (capped at the number of samples).
    """

    def __init__(self, inception_weights: str | None = None, lpips_weights: str | None = None,
                 kid_subset_size: int = 50, batch_size: int = 16):
        self.kid_subset_size = kid_subset_size  # KID subset size, capped by sample count
        self.batch_size = batch_size  # crops per backbone call
        self.fid = self.lpips = self.features = None
        if inception_weights:
            # One Inception pass per crop: FID and KID are fed the features through an identity "extractor".
            self.features = InceptionFeatures(inception_weights)
            self.fid = True
            self._real, self._fake = [], []
        if lpips_weights:
            self.lpips = LPIPSLoss(backbone_path=lpips_weights, net="alex")
            self._lpips_values: list[float] = []
        self.count = 0

    @property
    def needs_crops(self) -> bool:
        return self.fid is not None or self.lpips is not None

    @torch.no_grad()
    def update(self, original_crops, anonymized_crops) -> None:
        """Face crops, uint8 [N,H,W,3] each, pairwise corresponding."""
        if not self.needs_crops:
            return
        real, fake = _to_nchw_uint8(original_crops), _to_nchw_uint8(anonymized_crops)
        if real.shape != fake.shape:
            raise ValueError(f"crop batches differ: {tuple(real.shape)} vs {tuple(fake.shape)}")
        for i in range(0, len(real), self.batch_size):
            r, f = real[i : i + self.batch_size], fake[i : i + self.batch_size]
            if self.fid is not None:
                self._real.append(self.features(r).double())
                self._fake.append(self.features(f).double())
            if self.lpips is not None:
                to_pm1 = lambda x: x.float() / 127.5 - 1.0  # noqa: E731
                for a, b in zip(to_pm1(r), to_pm1(f)):
                    self._lpips_values.append(float(self.lpips(a[None], b[None])))
        self.count += len(real)

    def compute(self) -> dict[str, float | str]:
        out: dict[str, float | str] = {}
        if self.fid is None:
            out["fid"] = out["kid"] = UNAVAILABLE_INCEPTION
        elif self.count < 2:
            out["fid"] = out["kid"] = float("nan")
        else:
            real, fake = torch.cat(self._real), torch.cat(self._fake)
            out["fid"] = fid_from_features(real, fake)
            out["kid"] = kid_from_features(real, fake, self.kid_subset_size)
        if self.lpips is None:
            out["lpips"] = UNAVAILABLE_LPIPS
        else:
            out["lpips"] = float(np.mean(self._lpips_values)) if self._lpips_values else float("nan")
        return out


def fid_from_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID from precomputed features, computed by torchmetrics' ``FrechetInceptionDistance``.

    With fewer samples than feature dimensions the covariances are singular and FID is a rough number; report the
    sample count with it.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance  # heavy (torchmetrics): only for FID

    if min(len(real), len(fake)) < 2:
        return float("nan")
    fid = FrechetInceptionDistance(feature=_Identity(real.shape[1]))
    fid.update(real.double(), real=True)
    fid.update(fake.double(), real=False)
    return float(fid.compute())


def kid_from_features(real: torch.Tensor, fake: torch.Tensor, subset_size: int = 50, subsets: int = 100,
                      seed: int = 0) -> float:
    """Kernel Inception Distance (cubic polynomial kernel, unbiased MMD^2 averaged over random subsets).

    torchmetrics' ``KernelInceptionDistance`` is used for the computation; features are passed through an identity
    extractor so the Inception pass is not repeated, and its subset sampling is seeded for reproducible numbers.
    """
    from torchmetrics.image.kid import KernelInceptionDistance  # heavy (torchmetrics): only in kid_from_features()

    n = min(len(real), len(fake))
    if n < 2:
        return float("nan")
    kid = KernelInceptionDistance(feature=_Identity(real.shape[1]), subsets=subsets, subset_size=min(subset_size, n))
    kid.update(real, real=True)
    kid.update(fake, real=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        mean, _std = kid.compute()
    return float(mean)


class _Identity(nn.Module):
    """Feature 'extractor' for precomputed features (torchmetrics requires a module)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x
