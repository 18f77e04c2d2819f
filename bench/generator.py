"""Generator throughput benchmark: images/s and achieved GFLOP/s as a fraction of this machine's fp32 matmul peak.

    python -m bench.generator [--quick] [--threads N] [--device cpu]

Configs: ``tiny`` (64 px, configs/generator/tiny.yaml) and ``ffhq256`` (the official paper256 generator, random
weights), batch 1 and 8, full ``G(z)`` (mapping + synthesis, noise 'const', no autograd). FLOPs are counted
analytically as 2 x multiply-accumulates of every convolution (including the FIR resampling filters, transposed
convolutions counted at their input resolution as in the official implementation) and fully connected layer. The
peak is a oneDNN kernel (bench/peak.py: a 2048-channel 1x1 conv in channels_last, i.e. a 2048^3 GEMM, in the row's
dtype; torch.mm is MKL, about half of oneDNN's rate on AMD CPUs), measured in the same run with the same threads; both
are best-of-N timings, so a busy machine lowers both rather than the ratio. ``--precision 32,bf16`` adds rows under
keepr.precision.autocast. Prints a Markdown table. Not a test.
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

from bench.peak import conv_peak_gflops
from keepr.errors import cli_main
from keepr.precision import autocast, check_precision, compute_dtype
from models.stylegan2 import Generator
from models.stylegan2.loaders import build_generator, load_generator_config, make_tiny_generator
from models.stylegan2.networks import FullyConnectedLayer, SynthesisLayer, ToRGBLayer


def generator_flops(G: Generator) -> float:
    """Analytic FLOPs (2 x MACs) of one image through mapping + synthesis."""
    macs = 0
    for m in G.modules():
        if isinstance(m, FullyConnectedLayer):
            macs += m.in_features * m.out_features
        elif isinstance(m, SynthesisLayer):
            out_c, in_c, kh, kw = m.weight.shape
            r_in = m.resolution // m.up
            macs += out_c * in_c * kh * kw * r_in * r_in  # (transposed) convolution
            macs += out_c * in_c  # demodulation coefficients
            if m.up > 1:
                fh, fw = m.resample_filter.shape
                macs += out_c * fh * fw * m.resolution * m.resolution  # FIR after the transposed convolution
        elif isinstance(m, ToRGBLayer):
            out_c, in_c, kh, kw = m.weight.shape
            r = _torgb_resolution(G, m)
            macs += out_c * in_c * kh * kw * r * r
    for res in G.synthesis.block_resolutions[1:]:  # 'skip': upsample the running RGB image (depthwise FIR)
        fh, fw = getattr(G.synthesis, f"b{res}").resample_filter.shape
        macs += G.img_channels * fh * fw * (res // 2) ** 2
    return 2.0 * macs


def _torgb_resolution(G: Generator, layer: ToRGBLayer) -> int:
    for res in G.synthesis.block_resolutions:
        if getattr(getattr(G.synthesis, f"b{res}"), "torgb", None) is layer:
            return res
    raise ValueError("ToRGB layer not in the generator")


def best_time(fn, reps: int, min_seconds: float = 0.0) -> float:
    """Best wall time of ``reps`` calls after one warm-up call (more calls while under ``min_seconds`` total)."""
    fn()
    best, total, n = float("inf"), 0.0, 0
    while n < reps or total < min_seconds:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, total, n = min(best, dt), total + dt, n + 1
    return best


def matmul_peak_gflops(device: torch.device, reps: int, dtype=torch.float32) -> float:
    """oneDNN (cuDNN on CUDA) 2048^3 GEMM as a 1x1 conv; see bench/peak.py."""
    return conv_peak_gflops(device, dtype, seconds=0.5 if reps <= 1 else 1.0)


@cli_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one timed repetition per case")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per case (default 3, quick 1)")
    parser.add_argument("--precision", default="32", help="comma-separated precisions to time (32, bf16, 16)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    reps = args.reps or (1 if args.quick else 3)

    models = {
        "tiny": make_tiny_generator(seed=0),
        "ffhq256": build_generator(load_generator_config("ffhq256"), seed=0).eval().requires_grad_(False),
    }
    precisions = [check_precision(p, device) for p in args.precision.split(",")]
    rows = []
    peaks = {p: [matmul_peak_gflops(device, reps, compute_dtype(p))] for p in precisions}
    for name, G in models.items():
        G = G.to(device)
        flops = generator_flops(G)
        for batch in (1, 8):
            z = torch.randn(batch, G.z_dim, generator=torch.Generator().manual_seed(batch)).to(device)
            for prec in precisions:

                def run(G=G, z=z, prec=prec):  # this iteration's values
                    with torch.inference_mode(), autocast(device, prec):
                        G(z, truncation_psi=0.7, noise_mode="const")
                    if device.type == "cuda":
                        torch.cuda.synchronize()

                dt = best_time(run, reps, min_seconds=0.0 if args.quick else 1.0)
                rows.append((name, G.img_resolution, batch, prec, batch / dt, 1000 * dt / batch, flops / 1e9,
                             batch * flops / dt / 1e9))
        for p in precisions:
            peaks[p].append(matmul_peak_gflops(device, reps, compute_dtype(p)))
    peak = {p: max(v) for p, v in peaks.items()}

    threads = torch.get_num_threads() if device.type == "cpu" else "-"
    print(f"device: {device} ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
          f"threads: {threads}; oneDNN GEMM peak (2048^3 as a 1x1 conv, best of run): " +
          ", ".join(f"{p}: {v:.1f} GFLOP/s" for p, v in peak.items()) + "\n")
    print("| config | px | batch | precision | images/s | ms/image | GFLOP/image | GFLOP/s | % of peak (same dtype) |")
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for name, px, batch, prec, ips, ms, gf, gfs in rows:
        print(f"| {name} | {px} | {batch} | {prec} | {ips:.2f} | {ms:.1f} | {gf:.3f} | {gfs:.1f} | "
              f"{100 * gfs / peak[prec]:.0f}% |")


if __name__ == "__main__":
    main()
