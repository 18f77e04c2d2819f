"""The machine's matmul peak for the benchmarks' "% of peak": a oneDNN kernel, not torch.mm.

On x86 CPUs ``torch.mm`` in fp32 is MKL's GEMM, which on AMD CPUs runs at about half of oneDNN's rate (measured on a
2-core Zen 5: 2048^3 as a 1x1 conv in channels_last 207 GFLOP/s median vs torch.mm ~110), so dividing by it overstates
every fraction ~1.8x. The peak here is a 2048 -> 2048 channel 1x1 convolution on a 32x32 channels_last image, batch 2
(a 2048 x 2048 x 2048 GEMM run by oneDNN, the library the models' convolutions use), in fp32 or bf16; on CUDA the same
conv through cuDNN (TF32 off). Best of the repetitions, so a busy machine lowers it rather than the ratio.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F


def conv_peak_gflops(device="cpu", dtype=torch.float32, seconds: float = 1.0, n: int = 2048) -> float:
    """Best GFLOP/s of an n -> n channel 1x1 conv over n pixels (2 n^3 FLOPs) in channels_last, ``dtype``."""
    dev = torch.device(device)
    hw = int(round((n / 2) ** 0.5))
    x = torch.randn(2, n, hw, hw, device=dev, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(n, n, 1, 1, device=dev, dtype=dtype) / n ** 0.5).contiguous(memory_format=torch.channels_last)
    flops = 2.0 * n * n * x.shape[0] * hw * hw
    prev = torch.backends.cudnn.allow_tf32 if dev.type == "cuda" else None
    if dev.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    best = 0.0
    try:
        with torch.inference_mode():
            F.conv2d(x, w)
            sync()
            t_end = time.perf_counter() + seconds
            while True:
                t0 = time.perf_counter()
                F.conv2d(x, w)
                sync()
                best = max(best, flops / (time.perf_counter() - t0) / 1e9)
                if time.perf_counter() > t_end:
                    break
    finally:
        if prev is not None:
            torch.backends.cudnn.allow_tf32 = prev
    return best


def mm_gflops(device="cpu", seconds: float = 1.0, n: int = 2048) -> float:
    """torch.mm fp32 rate (MKL on CPU), for comparison only."""
    dev = torch.device(device)
    a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
    best, t_end = 0.0, time.perf_counter() + seconds
    torch.mm(a, b)
    while True:
        t0 = time.perf_counter()
        torch.mm(a, b)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        best = max(best, 2.0 * n ** 3 / (time.perf_counter() - t0) / 1e9)
        if time.perf_counter() > t_end:
            return best
