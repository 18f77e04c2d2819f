"""Image -> StyleGAN2 latent encoder (pSp / e4e style) and its export format.

The encoder is an IR-SE residual backbone (the ArcFace units used by pSp and e4e) followed by a head that predicts
either one w (``mode="w"``, broadcast to all ``num_ws`` layers) or one w per layer (``mode="w+"``). The head predicts an
offset from the generator's ``w_avg``, so an untrained encoder already returns the average face.

Export: ``save_encoder`` writes one ``.safetensors`` file whose metadata holds the constructor kwargs and the sha256 of
the generator the encoder was trained for; ``load_encoder(path, generator_path)`` refuses a different generator.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from keepr.errors import KeeprError
from keepr.fileio import atomic_path, sha256_file
from keepr.registry import missing

FORMAT_NAME = "keepr-encoder"
FORMAT_VERSION = 1
MODES = ("w", "w+")

# ----------------------------------------------------------------------------


class SEModule(nn.Module):
    """Squeeze-and-excitation: re-weights channels by a gate computed from their global average."""

    def __init__(self,
        channels,           # Number of input/output channels.
        reduction = 16,     # Channel reduction of the bottleneck.
    ):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1, bias=False)
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1, bias=False)

    def forward(self, x):
        g = x.mean(dim=(2, 3), keepdim=True)
        g = torch.sigmoid(self.fc2(F.relu(self.fc1(g))))
        return x * g


class BottleneckIR(nn.Module):
    """One improved-residual unit (BN-conv-PReLU-conv-BN [+SE]), downsampling by ``stride`` in its second conv."""

    def __init__(self,
        in_channels,        # Number of input channels.
        out_channels,       # Number of output channels.
        stride      = 1,    # 1 or 2.
        use_se      = True, # Squeeze-and-excitation on the residual branch (IR-SE).
        se_reduction = 16,  # Channel reduction of the SE gate.
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        if in_channels == out_channels:
            self.shortcut = nn.MaxPool2d(kernel_size=1, stride=stride)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        layers = [
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=False),
            nn.PReLU(out_channels),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        if use_se:
            layers.append(SEModule(out_channels, se_reduction))
        self.residual = nn.Sequential(*layers)

    def forward(self, x):
        assert x.ndim == 4 and x.shape[1] == self.in_channels, f"expected [N,{self.in_channels},H,W], got {tuple(x.shape)}"
        return self.shortcut(x) + self.residual(x)


class Encoder(nn.Module):
    """Aligned face image -> latent ws [N, num_ws, w_dim], as an offset from ``w_avg``.

    ``forward`` takes float RGB NCHW in [-1, 1] at any size; inputs of another size are resized (bilinear,
    antialiased) to ``img_resolution``. Stage ``i`` of the backbone halves the resolution and has ``channels[i]``
    channels; the head pools the last feature map to ``pool_size x pool_size`` and maps it through one hidden
    layer to the offsets.
    """

    def __init__(self,
        w_dim           = 512,                  # Latent dimensionality of the generator.
        num_ws          = 18,                   # Number of ws the generator's synthesis network takes.
        img_resolution  = 256,                  # Input resolution the backbone runs at.
        img_channels    = 3,                    # Number of input color channels.
        mode            = "w+",                 # "w": one w broadcast to all layers; "w+": one w per layer.
        channels        = (64, 128, 256, 512),  # Channels of each backbone stage (each halves the resolution).
        blocks          = (3, 4, 14, 3),        # IR units per stage (IR-SE-50 as in pSp/e4e by default).
        stem_stride     = 1,                    # Stride of the input conv (2 halves the cost of small models).
        use_se          = True,                 # IR-SE units (True) or plain IR units (False).
        pool_size       = 4,                    # Spatial size the head pools the last feature map to.
        pyramid_stats   = False,                # Also feed the head each stage's channel means and stds (multi-scale).
        hidden_dim      = 512,                  # Width of the head's hidden layer.
        dropout         = 0.0,                  # Dropout on the head's hidden layer while training (regularises small pair sets).
        offset_scale    = 1.0,                  # Multiplier on the predicted offset (eases small-init training).
    ):
        super().__init__()
        mode = str(mode).lower()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        channels, blocks = [int(c) for c in channels], [int(b) for b in blocks]
        if len(channels) != len(blocks) or not channels or min(blocks) < 1:
            raise ValueError(f"channels {channels} and blocks {blocks} must be non-empty lists of the same length")
        self.w_dim = int(w_dim)
        self.num_ws = int(num_ws)
        self.img_resolution = int(img_resolution)
        self.img_channels = int(img_channels)
        self.mode = mode
        self.offset_scale = float(offset_scale)
        self.init_kwargs = dict(w_dim=self.w_dim, num_ws=self.num_ws, img_resolution=self.img_resolution,
            img_channels=self.img_channels, mode=mode, channels=channels, blocks=blocks, stem_stride=int(stem_stride),
            use_se=bool(use_se), pool_size=int(pool_size), pyramid_stats=bool(pyramid_stats), hidden_dim=int(hidden_dim),
            dropout=float(dropout), offset_scale=self.offset_scale)
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.dropout = float(dropout)
        self.pyramid_stats = bool(pyramid_stats)

        self.stem = nn.Sequential(
            nn.Conv2d(img_channels, channels[0], kernel_size=3, stride=stem_stride, padding=1, bias=False),
            nn.BatchNorm2d(channels[0]),
            nn.PReLU(channels[0]),
        )
        stages = []
        in_ch = channels[0]
        for out_ch, n in zip(channels, blocks):
            units = []
            for i in range(n):
                units.append(BottleneckIR(in_ch, out_ch, stride=2 if i == 0 else 1, use_se=use_se))
                in_ch = out_ch
            stages.append(nn.Sequential(*units))
        self.stages = nn.ModuleList(stages)
        self.feat_res = self.img_resolution // stem_stride // 2 ** len(channels)
        if self.feat_res < 1:
            raise ValueError(f"img_resolution {img_resolution} too small for {len(channels)} stages")

        num_out = self.w_dim if mode == "w" else self.num_ws * self.w_dim
        self.pool = nn.Sequential(nn.BatchNorm2d(in_ch), nn.AdaptiveAvgPool2d(pool_size), nn.Flatten())
        head_in = in_ch * pool_size * pool_size
        if self.pyramid_stats:
            num_stats = 2 * (channels[0] + sum(channels))
            self.stats_norm = nn.BatchNorm1d(num_stats)
            head_in += num_stats
        self.head = nn.Sequential(
            nn.Linear(head_in, hidden_dim),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden_dim, num_out),
        )
        nn.init.zeros_(self.head[-1].weight)  # Start at w_avg: the trivial predictor.
        nn.init.zeros_(self.head[-1].bias)
        self.register_buffer("w_avg", torch.zeros(self.w_dim))

    def forward(self, img):
        assert img.ndim == 4 and img.shape[1] == self.img_channels, f"expected [N,{self.img_channels},H,W], got {tuple(img.shape)}"
        img = img.to(self.w_avg.dtype)
        if img.shape[2] != self.img_resolution or img.shape[3] != self.img_resolution:
            img = F.interpolate(img, size=(self.img_resolution, self.img_resolution), mode="bilinear",
                align_corners=False, antialias=True)
        x = self.stem(img)
        stats = [x]
        for stage in self.stages:
            x = stage(x)
            stats.append(x)
        assert x.shape[2] == self.feat_res, f"backbone output {tuple(x.shape)}, expected {self.feat_res}x{self.feat_res}"
        feats = [self.pool(x)]
        if self.pyramid_stats:
            # Per-channel mean and std of every scale: what modulated convolutions (the styles) act on.
            moments = [torch.cat([f.mean(dim=(2, 3)), f.flatten(2).std(dim=2, correction=0)], dim=1) for f in stats]
            feats.append(self.stats_norm(torch.cat(moments, dim=1)))
        hidden = self.head[1](self.head[0](torch.cat(feats, dim=1)))
        hidden = F.dropout(hidden, self.dropout, self.training)  # Functional: the head's state_dict keys stay the same.
        offset = self.head[2](hidden) * self.offset_scale
        if self.mode == "w":
            offset = offset.unsqueeze(1).expand(-1, self.num_ws, -1)
        else:
            offset = offset.reshape(-1, self.num_ws, self.w_dim)
        return self.w_avg.reshape(1, 1, -1) + offset

    def extra_repr(self):
        return f"mode={self.mode}, w_dim={self.w_dim}, num_ws={self.num_ws}, img_resolution={self.img_resolution}"


# ----------------------------------------------------------------------------
# Export / import.


def _other_generator(path, generator_path, expected: str, actual: str) -> KeeprError:
    return KeeprError(f"{path}: encoder was trained for generator sha256 {expected}, not {generator_path} "
                      f"(sha256 {actual})")


def save_encoder(encoder: Encoder, path: str | os.PathLike, generator_path: str | os.PathLike,
                 extra: dict[str, Any] | None = None, generator_sha256: str | None = None) -> Path:
    """Write ``encoder`` (weights, kwargs, w_avg) to one ``.safetensors`` file tied to the generator at
    ``generator_path`` (its sha256 is recorded). ``generator_sha256``, when known (the generator the encoder was
    trained against), must be that file's: a generator that moved is found by its new path, another file is refused.
    """

    generator_path = Path(generator_path)
    if not generator_path.is_file():
        raise KeeprError(f"{generator_path}: generator file not found; the export records its sha256")
    actual = sha256_file(generator_path)
    if generator_sha256 is not None and actual != generator_sha256:
        raise _other_generator(path, generator_path, generator_sha256, actual)
    meta = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(encoder.init_kwargs),
        "generator": json.dumps({"path": str(generator_path), "sha256": actual}),
        "extra": json.dumps(extra or {}),
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    path = Path(path)
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def read_encoder_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The decoded metadata of an exported encoder: ``config``, ``generator`` {path, sha256}, ``extra``."""

    path = Path(path)
    if not path.is_file():
        raise missing("encoder", path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for corrupt headers.
        raise KeeprError(f"{path}: cannot read the trained encoder: the safetensors file is truncated or corrupt "
                         f"({' '.join(str(exc).split())}).") from None
    if meta.get("format") != FORMAT_NAME:
        raise KeeprError(f"{path}: not a KEEP:R encoder export (metadata format={meta.get('format')!r})")
    try:
        return {
            "format_version": int(meta.get("format_version", "0")),
            "config": json.loads(meta["config"]),
            "generator": json.loads(meta["generator"]),
            "extra": json.loads(meta.get("extra", "{}")),
        }
    except (KeyError, ValueError) as exc:
        raise KeeprError(f"{path}: encoder metadata is damaged ({exc})") from None


def load_encoder(path: str | os.PathLike, generator_path: str | os.PathLike | None,
                 device: str | torch.device = "cpu") -> Encoder:
    """Load an exported encoder in eval mode, checking that ``generator_path`` is the generator it was trained for.

    ``generator_path=None`` skips the check (inspection only; inference always passes its generator). The generator
    is found by the path given, wherever it now lies; the recorded path is only named in the error.
    """

    meta = read_encoder_metadata(path)
    if generator_path is not None:
        generator_path = Path(generator_path)
        if not generator_path.is_file():
            raise missing("generator", generator_path)
        expected = meta["generator"].get("sha256")
        actual = sha256_file(generator_path)
        if actual != expected:
            raise KeeprError(f"{path}: encoder was trained for generator {meta['generator'].get('path')} "
                             f"(sha256 {expected}), not {generator_path} (sha256 {actual})")
    encoder = Encoder(**meta["config"])
    try:
        state = load_file(str(path), device="cpu")
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for truncated data.
        raise KeeprError(f"{path}: cannot read the trained encoder: the safetensors file is truncated or corrupt "
                         f"({' '.join(str(exc).split())}).") from None
    try:
        absent, unexpected = encoder.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # Shape mismatch: made by another version of this code.
        raise KeeprError(f"{path}: encoder weights do not match its config ({str(exc).splitlines()[-1].strip()}); "
                         f"re-train or re-export it with this version") from None
    if absent or unexpected:
        raise KeeprError(f"{path}: encoder weights do not match its config (missing {absent[:3]}, unexpected "
                         f"{unexpected[:3]}); "
                         f"re-train or re-export it with this version")
    return encoder.eval().requires_grad_(False).to(device)
