"""LPIPS perceptual distance whose ImageNet backbone comes from a file the user supplies.

The ``lpips`` package ships its calibrated linear heads but builds the AlexNet/VGG trunk through torchvision, which
would download ImageNet weights. We build the trunk randomly initialised (``pnet_rand=True``, nothing downloads) and
then load the torchvision ``features`` weights from ``backbone_path`` (e.g. ``alexnet-owt-7be5be79.pth``). Without
that file the loss cannot be computed, and asking for it fails with ``MissingWeightsError``.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import torch
from torch import nn

from keepr.errors import KeeprError
from keepr.registry import missing, where
from keepr.weights import read_state_dict

NETS = ("alex", "vgg")  # the trunks the LPIPS paper calibrated (keepr.registry: lpips_alex, lpips_vgg)


class LPIPSLoss(nn.Module):
    """Mean LPIPS distance between two image batches in [-1, 1]; frozen, always in eval mode."""

    def __init__(self,
        backbone_path   = None,     # torchvision ImageNet weights of the trunk (required; never downloaded).
        net             = "alex",   # "alex" or "vgg" (the trunks the LPIPS paper calibrated).
    ):
        super().__init__()
        if net not in NETS:
            raise KeeprError(f"LPIPS net must be one of {list(NETS)}, got {net!r}")
        if backbone_path is None or str(backbone_path) == "":
            raise KeeprError(f"LPIPS loss requested but no backbone weights given: set the {net} ImageNet weights path "
                             f"(get it from: {where('lpips_' + net)})")
        path = Path(backbone_path)
        if not path.is_file():
            raise missing(f"lpips_{net}", path)
        import lpips  # heavy (lpips): only in __init__()

        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore", UserWarning)  # torchvision's 'pretrained' deprecation notice.
            self.model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
        self._load_backbone(path)
        self.model.eval().requires_grad_(False)

    def _load_backbone(self, path: Path) -> None:
        state = read_state_dict(path, "LPIPS backbone")
        trunk = self.model.net
        wanted = {}
        for key in trunk.state_dict():
            _slice, index, param = key.split(".", 2)   # "slice2.3.weight" -> torchvision "features.3.weight"
            wanted[key] = f"features.{index}.{param}"
        missing = [src for src in wanted.values() if src not in state]
        if missing:
            raise KeeprError(f"{path}: not torchvision {self.model.pnet_type} ImageNet weights (missing {missing[:3]})")
        try:
            trunk.load_state_dict({dst: state[src] for dst, src in wanted.items()})
        except RuntimeError as exc:
            raise KeeprError(f"{path}: LPIPS backbone weights have the wrong shapes "
                             f"({str(exc).splitlines()[0]})") from None

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.eval()  # Dropout in the linear heads stays off.
        return self

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        assert x.shape == y.shape and x.ndim == 4, \
            f"LPIPS needs two equal NCHW batches, got {tuple(x.shape)} and {tuple(y.shape)}"
        return self.model(x, y).mean()
