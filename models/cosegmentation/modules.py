"""Networks of Motion-Supervised Co-Part Segmentation (Siarohin et al., CVPR 2020).

Module and parameter names follow the authors' code, so ``state_dict()`` keys equal the keys of the released
``vox-*segments.pth.tar`` checkpoints. Every width, depth and scale comes from the constructor arguments, which mirror
the ``model_params`` section of the official YAML configs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------
# Helpers.


def coordinate_grid(h: int, w: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """Identity sampling grid [h, w, 2] holding (x, y) in [-1, 1]; pixel centres at -1 and +1."""
    x = torch.arange(w, dtype=dtype, device=device)
    y = torch.arange(h, dtype=dtype, device=device)
    x = 2 * (x / (w - 1)) - 1
    y = 2 * (y / (h - 1)) - 1
    return torch.stack([x.view(1, w).expand(h, w), y.view(h, 1).expand(h, w)], dim=-1)


def _check_nchw(x: torch.Tensor, channels: int, name: str) -> None:
    if x.ndim != 4 or x.shape[1] != channels:
        raise ValueError(f"{name}: expected [N, {channels}, H, W], got {list(x.shape)}")


# ----------------------------------------------------------------------------
# Building blocks.


class AntiAliasInterpolation2d(nn.Module):
    """Gaussian blur then nearest subsampling: the anti-aliased downscale in front of the segmentation U-Net."""

    def __init__(self,
        channels    = 3,        # Number of image channels (blurred separately).
        scale       = 0.25,     # Output size / input size.
    ):
        super().__init__()
        sigma = (1 / scale - 1) / 2
        kernel_size = 2 * round(sigma * 4) + 1
        self.ka = kernel_size // 2
        self.kb = self.ka - 1 if kernel_size % 2 == 0 else self.ka
        taps = torch.arange(kernel_size, dtype=torch.float32) - (kernel_size - 1) / 2
        g = torch.exp(-taps ** 2 / (2 * sigma ** 2))
        kernel = g[:, None] * g[None, :]
        kernel = kernel / kernel.sum()
        self.register_buffer("weight", kernel.view(1, 1, kernel_size, kernel_size).repeat(channels, 1, 1, 1))
        self.groups = channels
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale == 1:
            return x
        out = F.pad(x, (self.ka, self.kb, self.ka, self.kb))
        out = F.conv2d(out, self.weight, groups=self.groups)
        step = round(1 / self.scale)
        if abs(step * self.scale - 1) < 1e-9:
            return out[:, :, ::step, ::step]  # Same pixels as nearest interpolation by an integer factor.
        return F.interpolate(out, scale_factor=(self.scale, self.scale))


class SameBlock2d(nn.Module):
    """conv -> BN -> ReLU at the same resolution."""

    def __init__(self,
        in_features,            # Input channels.
        out_features,           # Output channels.
        kernel_size = 3,        # Conv kernel size.
        padding     = 1,        # Zero padding.
    ):
        super().__init__()
        self.conv = nn.Conv2d(in_features, out_features, kernel_size=kernel_size, padding=padding)
        self.norm = nn.BatchNorm2d(out_features, affine=True)

    def forward(self, x):
        return F.relu(self.norm(self.conv(x)))


class DownBlock2d(nn.Module):
    """conv -> BN -> ReLU -> 2x2 average pool."""

    def __init__(self,
        in_features,            # Input channels.
        out_features,           # Output channels.
        kernel_size = 3,        # Conv kernel size.
        padding     = 1,        # Zero padding.
    ):
        super().__init__()
        self.conv = nn.Conv2d(in_features, out_features, kernel_size=kernel_size, padding=padding)
        self.norm = nn.BatchNorm2d(out_features, affine=True)
        self.pool = nn.AvgPool2d(kernel_size=(2, 2))

    def forward(self, x):
        return self.pool(F.relu(self.norm(self.conv(x))))


class UpBlock2d(nn.Module):
    """Nearest x2 upsample -> conv -> BN -> ReLU."""

    def __init__(self,
        in_features,            # Input channels.
        out_features,           # Output channels.
        kernel_size = 3,        # Conv kernel size.
        padding     = 1,        # Zero padding.
    ):
        super().__init__()
        self.conv = nn.Conv2d(in_features, out_features, kernel_size=kernel_size, padding=padding)
        self.norm = nn.BatchNorm2d(out_features, affine=True)

    def forward(self, x):
        return F.relu(self.norm(self.conv(F.interpolate(x, scale_factor=2))))


class ResBlock2d(nn.Module):
    """Pre-activation residual block: x + conv2(ReLU(BN2(conv1(ReLU(BN1(x))))))."""

    def __init__(self,
        in_features,            # Channels (kept).
        kernel_size = 3,        # Conv kernel size.
        padding     = 1,        # Zero padding.
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_features, in_features, kernel_size=kernel_size, padding=padding)
        self.conv2 = nn.Conv2d(in_features, in_features, kernel_size=kernel_size, padding=padding)
        self.norm1 = nn.BatchNorm2d(in_features, affine=True)
        self.norm2 = nn.BatchNorm2d(in_features, affine=True)

    def forward(self, x):
        out = self.conv1(F.relu(self.norm1(x)))
        out = self.conv2(F.relu(self.norm2(out)))
        return out + x


class Encoder(nn.Module):
    """U-Net encoder: returns the input and every down block's output, finest first."""

    def __init__(self,
        block_expansion,        # Width multiplier.
        in_features,            # Input channels.
        num_blocks   = 3,       # Number of down blocks.
        max_features = 256,     # Width cap.
    ):
        super().__init__()
        self.down_blocks = nn.ModuleList([
            DownBlock2d(in_features if i == 0 else min(max_features, block_expansion * (2 ** i)),
                        min(max_features, block_expansion * (2 ** (i + 1))))
            for i in range(num_blocks)])

    def forward(self, x):
        outs = [x]
        for block in self.down_blocks:
            outs.append(block(outs[-1]))
        return outs


class Decoder(nn.Module):
    """U-Net decoder: after each up block, concatenate [output, encoder tensor of the same size]."""

    def __init__(self,
        block_expansion,        # Width multiplier.
        in_features,            # Channels of the U-Net input (last skip).
        num_blocks   = 3,       # Number of up blocks.
        max_features = 256,     # Width cap.
    ):
        super().__init__()
        blocks = []
        for i in reversed(range(num_blocks)):
            in_filters = (1 if i == num_blocks - 1 else 2) * min(max_features, block_expansion * (2 ** (i + 1)))
            blocks.append(UpBlock2d(in_filters, min(max_features, block_expansion * (2 ** i))))
        self.up_blocks = nn.ModuleList(blocks)
        self.out_filters = block_expansion + in_features

    def forward(self, feats):
        feats = list(feats)
        out = feats.pop()
        for block in self.up_blocks:
            out = torch.cat([block(out), feats.pop()], dim=1)
        return out


class Hourglass(nn.Module):
    """U-Net (encoder + decoder with skips)."""

    def __init__(self,
        block_expansion,        # Width multiplier.
        in_features,            # Input channels.
        num_blocks   = 3,       # Levels.
        max_features = 256,     # Width cap.
    ):
        super().__init__()
        self.encoder = Encoder(block_expansion, in_features, num_blocks, max_features)
        self.decoder = Decoder(block_expansion, in_features, num_blocks, max_features)
        self.out_filters = self.decoder.out_filters

    def forward(self, x):
        return self.decoder(self.encoder(x))


# ----------------------------------------------------------------------------
# Segmentation module: soft part masks + per-part affine motion.


class SegmentationModule(nn.Module):
    """Predicts (K+1) soft masks (channel 0 = background), part centres ``shift`` [N,K,2] and ``affine`` [N,K,2,2]."""

    def __init__(self,
        block_expansion      = 32,      # U-Net width multiplier.
        num_segments         = 10,      # K, number of parts (background not counted).
        num_channels         = 3,       # Image channels.
        max_features         = 1024,    # U-Net width cap.
        num_blocks           = 5,       # U-Net levels.
        temperature          = 0.1,     # Softmax temperature of the part-centre heatmaps.
        estimate_affine_part = False,   # Predict a 2x2 matrix per part (else translation only).
        scale_factor         = 1,       # Images are downscaled by this before the U-Net.
    ):
        super().__init__()
        self.num_segments = num_segments
        self.num_channels = num_channels
        self.temperature = temperature
        self.scale_factor = scale_factor
        self.predictor = Hourglass(block_expansion, in_features=num_channels, max_features=max_features,
                                   num_blocks=num_blocks)
        c = self.predictor.out_filters
        self.shift = nn.Conv2d(c, num_segments, kernel_size=(7, 7), padding=(3, 3))
        if estimate_affine_part:
            self.affine = nn.Conv2d(c, 4 * num_segments, kernel_size=(7, 7), padding=(3, 3))
            with torch.no_grad():  # Official init: identity matrices.
                self.affine.weight.zero_()
                self.affine.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 1.0] * num_segments))
        else:
            self.affine = None
        self.segmentation = nn.Conv2d(c, 1 + num_segments, kernel_size=(7, 7), padding=(3, 3))
        if scale_factor != 1:
            self.down = AntiAliasInterpolation2d(num_channels, scale_factor)

    def forward(self, x: torch.Tensor) -> dict:
        _check_nchw(x, self.num_channels, "SegmentationModule")
        if self.scale_factor != 1:
            x = self.down(x)
        feat = self.predictor(x)
        n, _, h, w = feat.shape
        k = self.num_segments
        out = {"segmentation": F.softmax(self.segmentation(feat), dim=1)}
        heat = F.softmax(self.shift(feat).reshape(n, k, h * w) / self.temperature, dim=2)  # [N,K,HW]
        grid = coordinate_grid(h, w, heat.dtype, heat.device).reshape(h * w, 2)
        out["shift"] = (heat.unsqueeze(-1) * grid).sum(dim=2)  # Heatmap-weighted mean position (x, y).
        if self.affine is not None:
            amap = self.affine(feat).reshape(n, k, 4, h * w)
            out["affine"] = (heat.unsqueeze(2) * amap).sum(dim=-1).reshape(n, k, 2, 2)
        return out


# ----------------------------------------------------------------------------
# Reconstruction module (generator): encoder, warp + blend in feature space, decoder.


class ReconstructionModule(nn.Module):
    """Johnson-style encoder/decoder; ``encode`` and ``decode`` are split so part swap can cache the source."""

    def __init__(self,
        num_channels          = 3,      # Image channels.
        block_expansion       = 64,     # Width of the first conv.
        max_features          = 512,    # Width cap.
        num_down_blocks       = 2,      # Down/up blocks (feature stride 2**num_down_blocks).
        num_bottleneck_blocks = 6,      # Residual blocks at the lowest resolution.
        num_segments          = 10,     # K, number of parts.
        estimate_visibility   = False,  # Multiply warped source features by the visibility map.
        **unused,                       # Other common_params (e.g. estimate_affine_part).
    ):
        super().__init__()
        self.num_channels = num_channels
        self.num_segments = num_segments
        self.estimate_visibility = estimate_visibility
        self.first = SameBlock2d(num_channels, block_expansion, kernel_size=(7, 7), padding=(3, 3))
        self.down_blocks = nn.ModuleList([
            DownBlock2d(min(max_features, block_expansion * (2 ** i)),
                        min(max_features, block_expansion * (2 ** (i + 1))),
                        kernel_size=(3, 3), padding=(1, 1))
            for i in range(num_down_blocks)])
        self.up_blocks = nn.ModuleList([
            UpBlock2d(min(max_features, block_expansion * (2 ** (num_down_blocks - i))),
                      min(max_features, block_expansion * (2 ** (num_down_blocks - i - 1))),
                      kernel_size=(3, 3), padding=(1, 1))
            for i in range(num_down_blocks)])
        self.bottleneck = nn.Sequential()
        width = min(max_features, block_expansion * (2 ** num_down_blocks))
        for i in range(num_bottleneck_blocks):
            self.bottleneck.add_module(f"r{i}", ResBlock2d(width, kernel_size=(3, 3), padding=(1, 1)))
        self.final = nn.Conv2d(block_expansion, num_channels, kernel_size=(7, 7), padding=(3, 3))
        self.feature_channels = width
        self.stride = 2 ** num_down_blocks

    def encode(self, img: torch.Tensor) -> torch.Tensor:
        """Image [N,C,H,W] in [0,1] -> features [N, feature_channels, H/stride, W/stride]."""
        _check_nchw(img, self.num_channels, "ReconstructionModule.encode")
        out = self.first(img)
        for block in self.down_blocks:
            out = block(out)
        return out

    def decode(self, feat: torch.Tensor) -> torch.Tensor:
        """Features -> image in [0,1] (sigmoid)."""
        _check_nchw(feat, self.feature_channels, "ReconstructionModule.decode")
        out = self.bottleneck(feat)
        for block in self.up_blocks:
            out = block(out)
        return torch.sigmoid(self.final(out))

    def segment_motion(self, seg_target: dict, seg_source: dict) -> torch.Tensor:
        """Per-part sampling grids [N, K+1, h, w, 2]: identity for the background, then
        A_s,k A_d,k^-1 (z - p_d,k) + p_s,k for each part (source entries may have batch 1)."""
        n, _, h, w = seg_target["segmentation"].shape
        k = self.num_segments
        z = coordinate_grid(h, w, seg_target["shift"].dtype, seg_target["shift"].device).view(1, 1, h, w, 2)
        grid = z - seg_target["shift"].view(n, k, 1, 1, 2)
        if "affine" in seg_target and seg_target["affine"] is not None:
            m = torch.matmul(seg_source["affine"], torch.inverse(seg_target["affine"]))  # [N,K,2,2]
            grid = torch.matmul(m.view(n, k, 1, 1, 2, 2), grid.unsqueeze(-1)).squeeze(-1)
        grid = grid + seg_source["shift"].view(-1, k, 1, 1, 2)
        return torch.cat([z.expand(n, 1, h, w, 2), grid], dim=1)

    def deformation(self, seg_target: dict, seg_source: dict) -> torch.Tensor:
        """Dense deformation [N,h,w,2] = sum over channels of target mask x per-part grid."""
        motions = self.segment_motion(seg_target, seg_source)                   # [N,K+1,h,w,2]
        return (motions * seg_target["segmentation"].unsqueeze(-1)).sum(dim=1)  # [N,h,w,2]

    @staticmethod
    def deform_input(inp: torch.Tensor, deformation: torch.Tensor, align_corners: bool = True) -> torch.Tensor:
        """grid_sample (bilinear, zero padding); the grid is resized bilinearly when sizes differ."""
        _, h_old, w_old, _ = deformation.shape
        _, _, h, w = inp.shape
        if (h_old, w_old) != (h, w):
            deformation = F.interpolate(deformation.permute(0, 3, 1, 2), size=(h, w), mode="bilinear",
                                        align_corners=False).permute(0, 2, 3, 1)
        if inp.shape[0] != deformation.shape[0]:
            inp = inp.expand(deformation.shape[0], -1, -1, -1)
        return F.grid_sample(inp, deformation, mode="bilinear", padding_mode="zeros", align_corners=align_corners)


# ----------------------------------------------------------------------------
# Inference form of the reconstruction module: same function, fewer memory passes and FLOPs.


def _fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights of conv followed by inference BatchNorm as one conv (computed in float64)."""
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    w = conv.weight.double() * scale.view(-1, 1, 1, 1)
    b = (conv.bias.double() - bn.running_mean.double()) * scale + bn.bias.double()
    return w, b


# Nearest x2 upsampling followed by a 3x3 conv equals four 2x2 convs on the small input, one per output phase
# (row parity a, column parity b): taps that land on the same input pixel are summed.
_PHASE_TAPS = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]],    # even output rows: input rows i-1, i
                            [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]],   # odd output rows: input rows i, i+1
                           dtype=torch.float64)


class FoldedReconstruction(nn.Module):
    """``ReconstructionModule.encode/decode`` for inference: BatchNorm folded into the preceding convs, ReLUs in place,
    and each up block (nearest x2 -> 3x3 conv) computed as one 2x2 conv with 4x the outputs on the small input, then
    interleaved (2.25x fewer FLOPs, no upsampled copy). Equal to the original up to float32 rounding (~1e-6).

    ``dtype``: the dtype the convolutions run in (weights folded in float64, then cast once). With bf16/fp16 the
    encoder output and the decoder's activations are in that dtype; the last conv (64 -> 3 channels, ~1% of the
    FLOPs) and the sigmoid run in fp32, so the output image is fp32 and not quantized to bf16 steps near 1.
    ``memory_format``: activations channels_last (NHWC) end to end, interleave included, or contiguous (NCHW)."""

    def __init__(self, rec: ReconstructionModule, dtype: torch.dtype | None = None,
                 memory_format: torch.memory_format = torch.contiguous_format):
        super().__init__()
        self.num_channels = rec.num_channels
        self.feature_channels = rec.feature_channels
        self.dtype = rec.final.weight.dtype if dtype is None else dtype
        self.memory_format = memory_format
        with torch.no_grad():
            self.first = self._pack(*_fold_bn(rec.first.conv, rec.first.norm))
            self.down = [self._pack(*_fold_bn(b.conv, b.norm)) for b in rec.down_blocks]
            self.res = []
            for blk in rec.bottleneck:
                s1 = blk.norm1.weight.double() / torch.sqrt(blk.norm1.running_var.double() + blk.norm1.eps)
                t1 = blk.norm1.bias.double() - blk.norm1.running_mean.double() * s1
                w1, b1 = _fold_bn(blk.conv1, blk.norm2)
                self.res.append((s1.to(self.dtype).view(1, -1, 1, 1), t1.to(self.dtype).view(1, -1, 1, 1)) +
                                self._pack(w1, b1) +
                                self._pack(blk.conv2.weight.double(), blk.conv2.bias.double()))
            self.up = []
            for blk in rec.up_blocks:
                w, b = _fold_bn(blk.conv, blk.norm)
                if tuple(w.shape[2:]) == (3, 3) and blk.conv.padding == (1, 1):
                    taps = _PHASE_TAPS.to(w.device)
                    w4 = torch.einsum("apk,oikl,bql->aboipq", taps, w, taps)  # [2,2,Cout,Cin,2,2]
                    self.up.append(("phase",) + self._pack(w4.reshape(-1, *w4.shape[3:]), b.repeat(4)))
                else:
                    self.up.append(("plain",) + self._pack(w, b) + (blk.conv.padding,))
            fw, fb = rec.final.weight.detach(), rec.final.bias.detach()
            o, _, kh, kw = fw.shape
            self.final_split = (o < 16 and kh % 2 == 1 and kw % 2 == 1 and rec.final.padding == (kh // 2, kw // 2)
                                and memory_format == torch.channels_last)
            if self.final_split:
                # A conv with 3 outputs leaves oneDNN's vector lanes (16 output channels) mostly empty: ~9 GFLOP/s.
                # As a kh x 1 conv to kw*3 channels (one per column tap) then kw shifted adds: 1.6-2.3x faster.
                fw = fw.permute(3, 0, 1, 2).reshape(kw * o, fw.shape[1], kh, 1)
            self.final = (fw.contiguous(memory_format=memory_format), fb.contiguous())
        self.first_pad, self.final_pad = rec.first.conv.padding, rec.final.padding
        self.down_pad = [b.conv.padding for b in rec.down_blocks]

    def _pack(self, w, b):
        return (w.to(self.dtype).contiguous(memory_format=self.memory_format), b.to(self.dtype).contiguous())

    def encode(self, img: torch.Tensor) -> torch.Tensor:
        """Image [N,C,H,W] -> features in ``dtype`` and ``memory_format``."""
        _check_nchw(img, self.num_channels, "FoldedReconstruction.encode")
        img = img.to(self.dtype).contiguous(memory_format=self.memory_format)
        out = F.conv2d(img, *self.first, padding=self.first_pad).relu_()
        for (w, b), pad in zip(self.down, self.down_pad):
            out = F.avg_pool2d(F.conv2d(out, w, b, padding=pad).relu_(), 2)
        return out

    def decode(self, feat: torch.Tensor) -> torch.Tensor:
        _check_nchw(feat, self.feature_channels, "FoldedReconstruction.decode")
        out = feat.to(self.dtype).contiguous(memory_format=self.memory_format)
        for s1, t1, w1, b1, w2, b2 in self.res:
            h = torch.addcmul(t1, out, s1).relu_()
            h = F.conv2d(h, w1, b1, padding=1).relu_()
            out = F.conv2d(h, w2, b2, padding=1).add_(out)
        for kind, w, b, *rest in self.up:
            if kind == "phase":
                out = self._interleave(F.conv2d(out, w, b, padding=1).relu_())  # conv: [N, 4*Cout, H+1, W+1]
            else:
                out = F.conv2d(F.interpolate(out, scale_factor=2), w, b, padding=rest[0]).relu_()
        if out.dtype != self.final[0].dtype:
            out = out.to(self.final[0].dtype)
        if not self.final_split:
            return torch.sigmoid_(F.conv2d(out, *self.final, padding=self.final_pad))
        w, b = self.final
        o, (ph, pw) = b.shape[0], self.final_pad
        z = F.conv2d(out, w, padding=(ph, 0))                                  # [N, kw*O, H, W]
        n, _, h, wd = z.shape
        z = F.pad(z, (pw, pw))
        y = z[:, 0:o, :, 0:wd] + b.view(1, o, 1, 1)
        for kx in range(1, 2 * pw + 1):
            y += z[:, kx * o:(kx + 1) * o, :, kx:kx + wd]
        return torch.sigmoid_(y)

    def _interleave(self, y: torch.Tensor) -> torch.Tensor:
        """[N, (a, b, C), H+1, W+1] phase outputs -> [N, C, 2H, 2W] with out[..., 2i+a, 2j+b] = y[a, b, ..., i+a, j+b],
        written into one output tensor in ``memory_format`` (four strided copies)."""
        n, c4, h1, w1 = y.shape
        c, h, wd = c4 // 4, h1 - 1, w1 - 1
        if self.memory_format == torch.channels_last:
            yv = y.permute(0, 2, 3, 1).reshape(n, h1, w1, 2, 2, c)              # free view when y is NHWC
            out = torch.empty((n, 2 * h, 2 * wd, c), dtype=y.dtype, device=y.device)
            ov = out.view(n, h, 2, wd, 2, c)
            for a in (0, 1):
                for b in (0, 1):
                    ov[:, :, a, :, b].copy_(yv[:, a:a + h, b:b + wd, a, b])
            return out.permute(0, 3, 1, 2)                                      # NCHW view, NHWC memory
        yv = y.view(n, 2, 2, c, h1, w1)
        out = torch.empty((n, c, 2 * h, 2 * wd), dtype=y.dtype, device=y.device)
        ov = out.view(n, c, h, 2, wd, 2)
        for a in (0, 1):
            for b in (0, 1):
                ov[:, :, :, a, :, b].copy_(yv[:, a, b, :, a:a + h, b:b + wd])
        return out
