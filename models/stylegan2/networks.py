"""StyleGAN2 generator in pure PyTorch, numerically equal to NVlabs stylegan2-ada-pytorch (config-f family).

Module and parameter names follow NVlabs exactly, so ``state_dict()`` keys are the keys of an official network pickle
(``mapping.fc0.weight``, ``synthesis.b4.conv1.affine.bias``, ...). No custom CUDA ops: the resampling filters run as
ordinary (depthwise) convolutions, so the same code runs on CPU and GPU. Always fp32: ``num_fp16_res`` is accepted
and ignored (the official fp16 layers only change rounding).

Three execution paths for a synthesis layer give the same result (to ~1e-5), chosen by ``fused_modconv``:
- ``True``: the official fused path (per-sample weights, one grouped convolution);
- ``False``: the official unfused path (scale activations by the styles, shared-weight batched convolution, scale
  the output by the demodulation coefficients);
- ``None`` (default): the unfused path arranged for speed: channels_last activations, the activation gain folded
  into the demodulation and bias terms, in-place epilogue when autograd is off, modulated weights for a batch of
  one, and ToRGB as a batched matmul over pixels.
"""
from __future__ import annotations

import json
import math
from contextlib import nullcontext as _nullcontext
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from keepr.fileio import atomic_path

KEEPR_FORMAT = "keepr.stylegan2.generator"
KEEPR_FORMAT_VERSION = "1"

# ----------------------------------------------------------------------------------------------------------------
# Elementwise ops.

_ACTIVATIONS = {
    # name: (function, default gain)
    "linear": (lambda x: x, 1.0),
    "relu": (F.relu, math.sqrt(2)),
    "lrelu": (lambda x: F.leaky_relu(x, 0.2), math.sqrt(2)),
}


def _check_activation(name: str) -> None:
    if name not in _ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(_ACTIVATIONS)}")


def bias_act(x: torch.Tensor, b: Optional[torch.Tensor] = None, dim: int = 1, act: str = "linear",
             gain: Optional[float] = None, clamp: Optional[float] = None) -> torch.Tensor:
    """Add a bias along ``dim``, apply the activation, multiply by ``gain`` (default: the activation's), clamp."""
    fn, def_gain = _ACTIVATIONS[act]
    gain = def_gain if gain is None else float(gain)
    if b is not None:
        shape = [1] * x.ndim
        shape[dim] = -1
        x = x + b.reshape(shape)
    x = fn(x)
    if gain != 1:
        x = x * gain
    if clamp is not None and clamp >= 0:
        x = x.clamp(-clamp, clamp)
    return x


def normalize_2nd_moment(x: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    """Scale each vector to unit root-mean-square (the mapping network's input normalization)."""
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


# ----------------------------------------------------------------------------------------------------------------
# FIR resampling (upfirdn2d), as ordinary convolutions.

def setup_filter(f: Sequence[float] | torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """1-D taps -> 2-D separable FIR filter (outer product), normalized to unit sum, as a float32 tensor."""
    f = torch.as_tensor(f, dtype=torch.float32)
    if f.ndim == 0:
        f = f[None]
    if f.ndim == 1:
        f = f.ger(f)
    if f.ndim != 2:
        raise ValueError(f"resample filter must be 1-D or 2-D, got shape {list(f.shape)}")
    if normalize:
        f = f / f.sum()
    return f


def upfirdn2d(x: torch.Tensor, f: torch.Tensor, up: int = 1, down: int = 1, padding: Sequence[int] = (0, 0, 0, 0),
              flip_filter: bool = False, gain: float = 1.0) -> torch.Tensor:
    """Upsample by zero insertion, pad (negative = crop) by (x0, x1, y0, y1), convolve with the 2-D FIR ``f``, downsample.

    Same semantics as the official ``upfirdn2d`` reference; the FIR runs as a depthwise ``conv2d``.
    """
    n, c, h, w = x.shape
    px0, px1, py0, py1 = [int(p) for p in padding]
    if up == 1 and down == 1 and px0 == px1 >= 0 and py0 == py1 >= 0:
        # Plain padded depthwise convolution: no zero insertion, no explicit pad copy.
        f = f.to(x.dtype) * (gain ** (f.ndim / 2))
        if not flip_filter:
            f = f.flip(list(range(f.ndim)))
        return F.conv2d(x, f[None, None].expand(c, 1, *f.shape), padding=[py0, px0], groups=c)
    if up > 1:
        x = x.reshape(n, c, h, 1, w, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])
        x = x.reshape(n, c, h * up, w * up)
    x = F.pad(x, [max(px0, 0), max(px1, 0), max(py0, 0), max(py1, 0)])
    x = x[:, :, max(-py0, 0): x.shape[2] - max(-py1, 0), max(-px0, 0): x.shape[3] - max(-px1, 0)]
    f = f.to(x.dtype) * (gain ** (f.ndim / 2))
    if not flip_filter:
        f = f.flip(list(range(f.ndim)))
    x = F.conv2d(x, f[None, None].expand(c, 1, *f.shape), groups=c)
    if down > 1:
        x = x[:, :, ::down, ::down]
    return x


def upsample2d(x: torch.Tensor, f: torch.Tensor, up: int = 2) -> torch.Tensor:
    """2x FIR upsampling with the official padding (output exactly ``up`` times larger), gain ``up**2``.

    Zero insertion + padding + convolution equals a strided depthwise transposed convolution with the same taps,
    cropped by ``fw - 1 - pad0`` on each side; that avoids materializing the zero-inserted image.
    """
    fh, fw = f.shape
    p0x, p0y = (fw + up - 1) // 2, (fh + up - 1) // 2
    if p0x >= up - 1 and p0y >= up - 1:
        c = x.shape[1]
        k = (f.to(x.dtype) * (up * up))[None, None].expand(c, 1, fh, fw)
        y = F.conv_transpose2d(x, k, stride=up, groups=c)
        cy, cx = fh - 1 - p0y, fw - 1 - p0x
        return y[:, :, cy: cy + x.shape[2] * up, cx: cx + x.shape[3] * up]
    p = [p0x, (fw - up) // 2, p0y, (fh - up) // 2]
    return upfirdn2d(x, f, up=up, padding=p, gain=up * up)


def conv2d_resample(x: torch.Tensor, w: torch.Tensor, f: Optional[torch.Tensor] = None, up: int = 1,
                    padding: int = 0, groups: int = 1, flip_weight: bool = True) -> torch.Tensor:
    """2-D convolution with optional 2x upsampling, equal to the official ``conv2d_resample`` (no downsampling).

    Upsampling: stride-``up`` transposed convolution followed by the FIR filter ``f`` (gain ``up**2``), with the
    official padding arithmetic. ``flip_weight=True`` means correlation (what ``F.conv2d`` does).
    """
    out_channels, in_per_group, kh, kw = w.shape
    if up == 1:
        if not flip_weight:
            w = w.flip([2, 3])
        return F.conv2d(x, w, padding=padding, groups=groups)
    fh, fw = f.shape
    px0 = padding + (fw + up - 1) // 2 - (kw - 1)
    px1 = padding + (fw - up) // 2 - (kw - up)
    py0 = padding + (fh + up - 1) // 2 - (kh - 1)
    py1 = padding + (fh - up) // 2 - (kh - up)
    if groups == 1:
        w = w.transpose(0, 1)
    else:
        w = w.reshape(groups, out_channels // groups, in_per_group, kh, kw).transpose(1, 2)
        w = w.reshape(groups * in_per_group, out_channels // groups, kh, kw)
    pxt = max(min(-px0, -px1), 0)
    pyt = max(min(-py0, -py1), 0)
    if flip_weight:  # transposed conv is a true convolution; flip to keep the caller's convention
        w = w.flip([2, 3])
    x = F.conv_transpose2d(x, w, stride=up, padding=[pyt, pxt], groups=groups)
    return upfirdn2d(x, f, padding=[px0 + pxt, px1 + pxt, py0 + pyt, py1 + pyt], gain=up * up)


def modulated_conv2d(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, noise: Optional[torch.Tensor] = None,
                     up: int = 1, padding: int = 0, resample_filter: Optional[torch.Tensor] = None,
                     demodulate: bool = True, flip_weight: bool = True, fused_modconv: bool = False) -> torch.Tensor:
    """StyleGAN2 modulated convolution: weight * style per input channel, optional demodulation, optional noise."""
    n = x.shape[0]
    out_channels, in_channels, kh, kw = weight.shape
    if styles.shape != (n, in_channels):
        raise ValueError(f"styles must be [{n}, {in_channels}], got {list(styles.shape)}")
    if not fused_modconv:
        dcoefs = None
        if demodulate:
            # sum_{i,k} (w_oik s_i)^2 = sum_i s_i^2 sum_k w_oik^2: no per-sample weights needed.
            dcoefs = (styles.square() @ weight.square().sum(dim=[2, 3]).t() + 1e-8).rsqrt()  # [N, O]
        x = x * styles.reshape(n, -1, 1, 1)
        x = conv2d_resample(x, weight, f=resample_filter, up=up, padding=padding, flip_weight=flip_weight)
        if dcoefs is not None:
            x = x * dcoefs.reshape(n, -1, 1, 1)
        if noise is not None:
            x = x + noise
        return x
    # Fused: per-sample weights and one grouped convolution.
    w = weight.unsqueeze(0) * styles.reshape(n, 1, -1, 1, 1)  # [N, O, I, k, k]
    if demodulate:
        w = w * (w.square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt().reshape(n, -1, 1, 1, 1)
    x = x.reshape(1, -1, *x.shape[2:])
    w = w.reshape(-1, in_channels, kh, kw)
    x = conv2d_resample(x, w, f=resample_filter, up=up, padding=padding, groups=n, flip_weight=flip_weight)
    x = x.reshape(n, -1, *x.shape[2:])
    if noise is not None:
        x = x + noise
    return x


# ----------------------------------------------------------------------------------------------------------------
# Layers.

class FullyConnectedLayer(torch.nn.Module):
    """Dense layer with equalized learning rate: weights stored raw, scaled by lr_multiplier / sqrt(in) in forward."""

    def __init__(self,
                 in_features,           # Number of input features.
                 out_features,          # Number of output features.
                 bias=True,             # Apply additive bias before the activation function?
                 activation="linear",   # Activation function: 'relu', 'lrelu', etc.
                 lr_multiplier=1,       # Learning rate multiplier.
                 bias_init=0,           # Initial value for the additive bias.
                 ):
        super().__init__()
        _check_activation(activation)
        self.in_features = in_features
        self.out_features = out_features
        self.activation = activation
        self.weight = torch.nn.Parameter(torch.randn([out_features, in_features]) / lr_multiplier)
        self.bias = torch.nn.Parameter(torch.full([out_features], np.float32(bias_init))) if bias else None
        self.weight_gain = lr_multiplier / np.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x):
        w = self.weight.to(x.dtype) * self.weight_gain
        b = self.bias
        if b is not None:
            b = b.to(x.dtype)
            if self.bias_gain != 1:
                b = b * self.bias_gain
        if self.activation == "linear" and b is not None:
            return torch.addmm(b.unsqueeze(0), x, w.t())
        return bias_act(x.matmul(w.t()), b, act=self.activation)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, activation={self.activation}"


class MappingNetwork(torch.nn.Module):
    """z (and optional class c) -> w, broadcast to num_ws copies; keeps the running mean ``w_avg`` for truncation."""

    def __init__(self,
                 z_dim,                 # Input latent (Z) dimensionality, 0 = no latent.
                 c_dim,                 # Conditioning label (C) dimensionality, 0 = no label.
                 w_dim,                 # Intermediate latent (W) dimensionality.
                 num_ws,                # Number of intermediate latents to output, None = do not broadcast.
                 num_layers=8,          # Number of mapping layers.
                 embed_features=None,   # Label embedding dimensionality, None = same as w_dim.
                 layer_features=None,   # Number of intermediate features in the mapping layers, None = same as w_dim.
                 activation="lrelu",    # Activation function: 'relu', 'lrelu', etc.
                 lr_multiplier=0.01,    # Learning rate multiplier for the mapping layers.
                 w_avg_beta=0.995,      # Decay for tracking the moving average of W during training, None = do not track.
                 ):
        super().__init__()
        self.z_dim = z_dim
        self.c_dim = c_dim
        self.w_dim = w_dim
        self.num_ws = num_ws
        self.num_layers = num_layers
        self.w_avg_beta = w_avg_beta
        if embed_features is None:
            embed_features = w_dim
        if c_dim == 0:
            embed_features = 0
        if layer_features is None:
            layer_features = w_dim
        features = [z_dim + embed_features] + [layer_features] * (num_layers - 1) + [w_dim]
        if c_dim > 0:
            self.embed = FullyConnectedLayer(c_dim, embed_features)
        for idx in range(num_layers):
            layer = FullyConnectedLayer(features[idx], features[idx + 1], activation=activation,
                                        lr_multiplier=lr_multiplier)
            setattr(self, f"fc{idx}", layer)
        if num_ws is not None and w_avg_beta is not None:
            self.register_buffer("w_avg", torch.zeros([w_dim]))

    def forward(self, z, c=None, truncation_psi=1, truncation_cutoff=None, skip_w_avg_update=False):
        dev = (z if z is not None else c).device.type
        if torch.is_autocast_enabled(dev):  # Tiny and sets every style: always fp32.
            with torch.autocast(dev, enabled=False):
                return self.forward(z, c, truncation_psi, truncation_cutoff, skip_w_avg_update)
        x = None
        if self.z_dim > 0:
            _assert_shape(z, [None, self.z_dim], "z")
            x = normalize_2nd_moment(z.to(torch.float32))
        if self.c_dim > 0:
            if c is None:
                raise ValueError(f"this generator is conditional (c_dim={self.c_dim}): pass c")
            _assert_shape(c, [None, self.c_dim], "c")
            y = normalize_2nd_moment(self.embed(c.to(torch.float32)))
            x = torch.cat([x, y], dim=1) if x is not None else y
        for idx in range(self.num_layers):
            x = getattr(self, f"fc{idx}")(x)
        if self.w_avg_beta is not None and self.training and not skip_w_avg_update:
            with torch.no_grad():
                self.w_avg.copy_(x.detach().mean(dim=0).lerp(self.w_avg, self.w_avg_beta))
        if self.num_ws is not None:
            x = x.unsqueeze(1).repeat([1, self.num_ws, 1])
        if truncation_psi != 1:
            if self.w_avg_beta is None:
                raise ValueError("truncation needs w_avg, but this mapping network does not track it")
            if self.num_ws is None or truncation_cutoff is None:
                x = self.w_avg.lerp(x, truncation_psi)
            else:
                x = x.clone()
                x[:, :truncation_cutoff] = self.w_avg.lerp(x[:, :truncation_cutoff], truncation_psi)
        return x


class SynthesisLayer(torch.nn.Module):
    """Modulated 3x3 convolution (optionally 2x upsampling) + noise + bias + leaky ReLU."""

    def __init__(self,
                 in_channels,                   # Number of input channels.
                 out_channels,                  # Number of output channels.
                 w_dim,                         # Intermediate latent (W) dimensionality.
                 resolution,                    # Resolution of this layer.
                 kernel_size=3,                 # Convolution kernel size.
                 up=1,                          # Integer upsampling factor.
                 use_noise=True,                # Enable noise input?
                 activation="lrelu",            # Activation function: 'relu', 'lrelu', etc.
                 resample_filter=[1, 3, 3, 1],  # Low-pass filter to apply when resampling activations.
                 conv_clamp=None,               # Clamp the output of convolution layers to +-X, None = disable clamping.
                 channels_last=False,           # Use channels_last format for the weights? (ignored)
                 ):
        super().__init__()
        _check_activation(activation)
        self.resolution = resolution
        self.up = up
        self.use_noise = use_noise
        self.activation = activation
        self.conv_clamp = conv_clamp
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        self.padding = kernel_size // 2
        self.act_gain = _ACTIVATIONS[activation][1]
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = torch.nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        if use_noise:
            self.register_buffer("noise_const", torch.randn([resolution, resolution]))
            self.noise_strength = torch.nn.Parameter(torch.zeros([]))
        self.bias = torch.nn.Parameter(torch.zeros([out_channels]))

    def forward(self, x, w, noise_mode="random", fused_modconv=None, gain=1, _inplace_input=False):
        """x [N, C_in, R/up, R/up], w [N, w_dim] -> [N, C_out, R, R].

        ``fused_modconv``: True = official grouped-conv path, False = official unfused path, None = the fast path
        (same result; fewer memory passes, in-place epilogue when autograd is off).
        """
        if noise_mode not in ("random", "const", "none"):
            raise ValueError(f"noise_mode must be 'random', 'const' or 'none', got {noise_mode!r}")
        in_resolution = self.resolution // self.up
        _assert_shape(x, [None, self.weight.shape[1], in_resolution, in_resolution], "x")
        styles = self.affine(w)
        noise = None
        if self.use_noise and noise_mode == "random":
            noise = torch.randn([x.shape[0], 1, self.resolution, self.resolution], device=x.device) * self.noise_strength
        if self.use_noise and noise_mode == "const":
            noise = self.noise_const * self.noise_strength
        if fused_modconv is None:
            return self._forward_fast(x, styles, noise, gain, inplace_input=_inplace_input)
        x = modulated_conv2d(x, self.weight, styles, noise=noise, up=self.up, padding=self.padding,
                             resample_filter=self.resample_filter, flip_weight=(self.up == 1),
                             fused_modconv=fused_modconv)
        act_gain = self.act_gain * gain
        act_clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return bias_act(x, self.bias.to(x.dtype), act=self.activation, gain=act_gain, clamp=act_clamp)

    def _weight_terms(self, dt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum_k w^2 [I, O] for the demodulation, the weight in ``dt``). Without autograd they are cached until the
        weight changes (a 512x512x3x3 square-sum costs ~25 ms on 2 CPU cores, more than a batch-1 conv)."""
        w = self.weight
        if torch.is_grad_enabled() and w.requires_grad:
            return w.square().sum(dim=[2, 3]).t(), w.to(dt)
        key = _tensor_key(w) + (dt,)
        if key[4] is None:  # an inference tensor: no version counter to notice an in-place edit, so no cache
            return w.square().sum(dim=[2, 3]).t(), w.to(dt)
        cache = self.__dict__.get("_wcache")
        if cache is None or cache[0] != key:
            with torch.no_grad():
                cache = (key, w.square().sum(dim=[2, 3]).t(), w.to(dt))
            self.__dict__["_wcache"] = cache
        return cache[1], cache[2]

    def _forward_fast(self, x, styles, noise, gain, inplace_input=False):
        # conv(x * s) * d + noise + bias, then the activation. The (positive) activation gain is folded into the
        # demodulation coefficients and the bias/noise term: act(g * v) == g * act(v) for relu/lrelu/linear.
        # Without autograd the epilogue runs in place (fresh large tensors cost page faults on CPU), and so does
        # the input scaling when the caller owns x (``inplace_input``: SynthesisBlock passes its temporaries).
        # Compute dtype = x's dtype (fp32, or bf16/fp16 when SynthesisNetwork runs reduced precision): styles and
        # demodulation coefficients are computed in fp32 and cast once, so every large tensor op has one dtype
        # (a mixed-dtype in-place epilogue is what made plain autocast slower than fp32).
        n = x.shape[0]
        dt = x.dtype
        inplace = not torch.is_grad_enabled()
        act_gain = self.act_gain * gain
        weight = self.weight
        wsq, weight_dt = self._weight_terms(dt)
        dcoefs = (styles.float().square() @ wsq + 1e-8).rsqrt() * act_gain
        if n == 1:  # one sample: modulate the weights instead of the activations (no grouping needed)
            wmod = (weight * styles.reshape(1, -1, 1, 1) * dcoefs.reshape(-1, 1, 1, 1)).to(dt)
            y = conv2d_resample(x, wmod, f=self.resample_filter, up=self.up, padding=self.padding,
                                flip_weight=(self.up == 1))
            scale = None
        else:
            s = styles.reshape(n, -1, 1, 1).to(dt)
            x = x.mul_(s) if (inplace and inplace_input) else x * s
            y = conv2d_resample(x, weight_dt, f=self.resample_filter, up=self.up, padding=self.padding,
                                flip_weight=(self.up == 1))
            scale = dcoefs.reshape(n, -1, 1, 1).to(dt)
        nb = self.bias.reshape(1, -1, 1, 1) * act_gain
        if noise is not None:
            # Same memory layout as y: broadcasting a differently laid out operand is slow on CPU.
            nb = (nb + noise * act_gain).to(dt).contiguous(memory_format=_layout(y))
        else:
            nb = nb.to(dt)
        if scale is None:
            y = y.add_(nb) if inplace else y + nb
        elif inplace:
            y = torch.addcmul(nb, y, scale, out=y) if nb.shape[0] == 1 else y.mul_(scale).add_(nb)
        else:
            y = torch.addcmul(nb, y, scale)
        if self.activation == "lrelu":
            y = F.leaky_relu_(y, 0.2) if inplace else F.leaky_relu(y, 0.2)
        elif self.activation == "relu":
            y = F.relu_(y) if inplace else F.relu(y)
        if self.conv_clamp is not None:
            c = self.conv_clamp * gain
            y = y.clamp_(-c, c) if inplace else y.clamp(-c, c)
        return y


def _tensor_key(t: torch.Tensor) -> tuple:
    """Identity of a tensor's current value for caches: storage, device, dtype, shape and version counter. Inference
    tensors (made under torch.inference_mode) have no version counter: their key is only where they live, so a cache
    stays valid until they are replaced (as .to() does), not after an in-place edit such as load_state_dict."""
    try:
        version = t._version
    except RuntimeError:
        version = None
    return (t.data_ptr(), t.device, t.dtype, tuple(t.shape), version)


def _layout(t: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if (t.ndim == 4 and not t.is_contiguous()
                                   and t.is_contiguous(memory_format=torch.channels_last)) else torch.contiguous_format


class ToRGBLayer(torch.nn.Module):
    """Modulated 1x1 convolution to RGB, without demodulation."""

    def __init__(self,
                 in_channels,           # Number of input channels.
                 out_channels,          # Number of output (image) channels.
                 w_dim,                 # Intermediate latent (W) dimensionality.
                 kernel_size=1,         # Convolution kernel size.
                 conv_clamp=None,       # Clamp the output to +-X, None = disable clamping.
                 channels_last=False,   # Use channels_last format for the weights? (ignored)
                 ):
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = torch.nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        self.bias = torch.nn.Parameter(torch.zeros([out_channels]))
        self.weight_gain = 1 / np.sqrt(in_channels * (kernel_size ** 2))

    def forward(self, x, w, fused_modconv=None):
        styles = self.affine(w) * self.weight_gain
        if fused_modconv is None and self.weight.shape[-1] == 1:
            # Fast path: a 1x1 modulated conv is a batched matmul over pixels with per-sample [C, 3] weights;
            # with channels_last activations the pixel matrix is a free view (no scaled copy of x).
            n, c, h, w_ = x.shape
            wmod = (self.weight[:, :, 0, 0].unsqueeze(0) * styles.unsqueeze(1)).to(x.dtype)  # [N, O, C]
            pixels = x.permute(0, 2, 3, 1).reshape(n, h * w_, c)
            y = torch.baddbmm(self.bias.to(x.dtype).reshape(1, 1, -1), pixels, wmod.transpose(1, 2))
            y = y.reshape(n, h, w_, -1).permute(0, 3, 1, 2)
            return y.clamp(-self.conv_clamp, self.conv_clamp) if self.conv_clamp is not None else y
        x = modulated_conv2d(x, self.weight, styles, demodulate=False, padding=self.weight.shape[-1] // 2,
                             fused_modconv=bool(fused_modconv))
        return bias_act(x, self.bias.to(x.dtype), clamp=self.conv_clamp)


class SynthesisBlock(torch.nn.Module):
    """One resolution: (const | 2x-up conv0), conv1, ToRGB; 'skip' adds the upsampled previous RGB image."""

    def __init__(self,
                 in_channels,                   # Number of input channels, 0 = first block.
                 out_channels,                  # Number of output channels.
                 w_dim,                         # Intermediate latent (W) dimensionality.
                 resolution,                    # Resolution of this block.
                 img_channels,                  # Number of output color channels.
                 is_last,                       # Is this the last block?
                 architecture="skip",           # Architecture: 'orig' or 'skip' ('resnet' is not supported).
                 resample_filter=[1, 3, 3, 1],  # Low-pass filter to apply when resampling activations.
                 conv_clamp=None,               # Clamp the output of convolution layers to +-X, None = disable clamping.
                 use_fp16=False,                # Ignored: KEEP:R always runs in fp32.
                 fp16_channels_last=False,      # Ignored.
                 **layer_kwargs,                # Arguments for SynthesisLayer.
                 ):
        if architecture not in ("orig", "skip"):
            raise ValueError(f"unsupported synthesis architecture {architecture!r}: KEEP:R supports 'skip' and 'orig'")
        super().__init__()
        self.in_channels = in_channels
        self.w_dim = w_dim
        self.resolution = resolution
        self.img_channels = img_channels
        self.is_last = is_last
        self.architecture = architecture
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        self.num_conv = 0
        self.num_torgb = 0
        if in_channels == 0:
            self.const = torch.nn.Parameter(torch.randn([out_channels, resolution, resolution]))
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, w_dim=w_dim, resolution=resolution, up=2,
                                        resample_filter=resample_filter, conv_clamp=conv_clamp, **layer_kwargs)
            self.num_conv += 1
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim=w_dim, resolution=resolution,
                                    resample_filter=resample_filter, conv_clamp=conv_clamp, **layer_kwargs)
        self.num_conv += 1
        if is_last or architecture == "skip":
            self.torgb = ToRGBLayer(out_channels, img_channels, w_dim=w_dim, conv_clamp=conv_clamp)
            self.num_torgb += 1

    def forward(self, x, img, ws, fused_modconv=None, _owns_input=False, compute_dtype=torch.float32,
                **layer_kwargs):
        _assert_shape(ws, [None, self.num_conv + self.num_torgb, self.w_dim], "ws")
        w_iter = iter(ws.unbind(dim=1))
        if self.in_channels == 0:
            x = self.const.unsqueeze(0).repeat([ws.shape[0], 1, 1, 1])
            if fused_modconv is None:  # fast path runs channels_last (faster convolutions on CPU and GPU)
                x = x.to(compute_dtype).contiguous(memory_format=torch.channels_last)
            x = self.conv1(x, next(w_iter), fused_modconv=fused_modconv, _inplace_input=True, **layer_kwargs)
        else:
            _assert_shape(x, [None, self.in_channels, self.resolution // 2, self.resolution // 2], "x")
            # x is the previous block's output; only this block still reads it (its ToRGB already ran).
            x = self.conv0(x, next(w_iter), fused_modconv=fused_modconv, _inplace_input=_owns_input, **layer_kwargs)
            x = self.conv1(x, next(w_iter), fused_modconv=fused_modconv, _inplace_input=True, **layer_kwargs)
        if img is not None:
            _assert_shape(img, [None, self.img_channels, self.resolution // 2, self.resolution // 2], "img")
            img = upsample2d(img, self.resample_filter)
        if self.is_last or self.architecture == "skip":
            y = self.torgb(x, next(w_iter), fused_modconv=fused_modconv)
            if y.dtype != torch.float32:  # reduced precision: the RGB image accumulates in fp32
                y = y.float()
            img = img + y if img is not None else y
        return x, img


class SynthesisNetwork(torch.nn.Module):
    """ws [N, num_ws, w_dim] -> image [N, img_channels, R, R]: blocks b4, b8, ..., b{R}."""

    def __init__(self,
                 w_dim,                 # Intermediate latent (W) dimensionality.
                 img_resolution,        # Output image resolution.
                 img_channels,          # Number of color channels.
                 channel_base=32768,    # Overall multiplier for the number of channels.
                 channel_max=512,       # Maximum number of channels in any layer.
                 num_fp16_res=0,        # Ignored: KEEP:R always runs in fp32.
                 **block_kwargs,        # Arguments for SynthesisBlock.
                 ):
        log2 = int(np.log2(img_resolution))
        if img_resolution < 4 or img_resolution != 2 ** log2:
            raise ValueError(f"img_resolution must be a power of two >= 4, got {img_resolution}")
        super().__init__()
        self.w_dim = w_dim
        self.img_resolution = img_resolution
        self.img_resolution_log2 = log2
        self.img_channels = img_channels
        self.block_resolutions = [2 ** i for i in range(2, log2 + 1)]
        channels = {res: min(channel_base // res, channel_max) for res in self.block_resolutions}
        self.num_ws = 0
        for res in self.block_resolutions:
            in_channels = channels[res // 2] if res > 4 else 0
            is_last = res == img_resolution
            block = SynthesisBlock(in_channels, channels[res], w_dim=w_dim, resolution=res,
                                   img_channels=img_channels, is_last=is_last, **block_kwargs)
            self.num_ws += block.num_conv
            if is_last:
                self.num_ws += block.num_torgb
            setattr(self, f"b{res}", block)

    def forward(self, ws, noise_mode="const", fused_modconv=None, **layer_kwargs):
        """ws [N, num_ws, w_dim] -> img [N, C, R, R]; nominally [-1, 1], not clamped."""
        _assert_shape(ws, [None, self.num_ws, self.w_dim], "ws")
        ws = ws.to(torch.float32)
        dev = ws.device.type
        compute_dtype = torch.float32
        if fused_modconv is None and torch.is_autocast_enabled(dev):
            # Reduced precision (autocast active, e.g. keepr.precision.autocast): the fast path runs its
            # activations and convolutions in the autocast dtype itself, with autocast off inside so no op gets a
            # hidden cast; styles, demodulation and the RGB image stay fp32. Output is fp32.
            compute_dtype = torch.get_autocast_dtype(dev)
        x = img = None
        w_idx = 0
        with torch.autocast(dev, enabled=False) if compute_dtype != torch.float32 else _nullcontext():
            for res in self.block_resolutions:
                block = getattr(self, f"b{res}")
                cur = ws.narrow(1, w_idx, block.num_conv + block.num_torgb)
                w_idx += block.num_conv
                x, img = block(x, img, cur, fused_modconv=fused_modconv, noise_mode=noise_mode, _owns_input=True,
                               compute_dtype=compute_dtype, **layer_kwargs)
        return img.contiguous()


class Generator(torch.nn.Module):
    """StyleGAN2 generator: ``mapping`` (z -> ws) then ``synthesis`` (ws -> image). NVlabs-compatible API and keys."""

    def __init__(self,
                 z_dim=512,             # Input latent (Z) dimensionality.
                 c_dim=0,               # Conditioning label (C) dimensionality.
                 w_dim=512,             # Intermediate latent (W) dimensionality.
                 img_resolution=1024,   # Output resolution.
                 img_channels=3,        # Number of output color channels.
                 mapping_kwargs={},     # Arguments for MappingNetwork.
                 **synthesis_kwargs,    # Arguments for SynthesisNetwork; a nested `synthesis_kwargs` dict is also accepted.
                 ):
        super().__init__()
        nested = synthesis_kwargs.pop("synthesis_kwargs", None) or {}
        synthesis_kwargs = {**dict(nested), **synthesis_kwargs}
        mapping_kwargs = dict(mapping_kwargs)
        self.init_kwargs = _jsonable(dict(z_dim=z_dim, c_dim=c_dim, w_dim=w_dim, img_resolution=img_resolution,
                                          img_channels=img_channels, mapping_kwargs=mapping_kwargs,
                                          synthesis_kwargs=synthesis_kwargs))
        self.z_dim = z_dim
        self.c_dim = c_dim
        self.w_dim = w_dim
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.synthesis = SynthesisNetwork(w_dim=w_dim, img_resolution=img_resolution, img_channels=img_channels,
                                          **synthesis_kwargs)
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(z_dim=z_dim, c_dim=c_dim, w_dim=w_dim, num_ws=self.num_ws, **mapping_kwargs)

    @property
    def w_avg(self) -> torch.Tensor:
        """Mean mapping output [w_dim] (the truncation centre)."""
        return self.mapping.w_avg

    def forward(self, z, c=None, truncation_psi=1, truncation_cutoff=None, noise_mode="const", **synthesis_kwargs):
        ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff)
        return self.synthesis(ws, noise_mode=noise_mode, **synthesis_kwargs)

    def save(self, path) -> None:
        """Write KEEP:R's format: one .safetensors file, constructor config as JSON in its metadata (atomic)."""
        save_generator(self, path)


# ----------------------------------------------------------------------------------------------------------------
# Saving (KEEP:R format; loading is in loaders.py).

def save_generator(G: Generator, path: str | Path) -> None:
    """Write KEEP:R's format atomically: NVlabs-named tensors in a .safetensors, ``init_kwargs`` JSON in its metadata."""
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in G.state_dict().items()}
    metadata = {"format": KEEPR_FORMAT, "format_version": KEEPR_FORMAT_VERSION,
                "init_kwargs": json.dumps(G.init_kwargs, sort_keys=True)}
    with atomic_path(path, ".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


# ----------------------------------------------------------------------------------------------------------------

def _assert_shape(t: torch.Tensor, shape: list, name: str) -> None:
    if t.ndim != len(shape) or any(s is not None and int(d) != s for d, s in zip(t.shape, shape)):
        want = "[" + ", ".join("N" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name} must have shape {want}, got {list(t.shape)}")


def _jsonable(obj):
    """Plain JSON-able copy of a config (dict subclasses -> dict, tuples -> lists, numpy scalars -> numbers)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return obj
