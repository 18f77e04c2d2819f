"""Benchmark co-part segmentation part swap: ms per frame at 256x256 (vox-10 config, random weights).

Four modes: batch 1 and batch N, each with the source cache (source encoded and segmented once) and without it
(the source is encoded and segmented again for every frame, so nothing is kept between frames; the authors'
make_video re-encodes the source in every call but segments it once).
Throughput is the analytic conv FLOP count (2*Cout*Cin/groups*kh*kw*Hout*Wout per sample, torch's FlopCounterMode on
the convs the model actually runs) over wall time, reported as a fraction of the oneDNN fp32 GEMM rate (bench/peak.py: a
2048-channel 1x1 conv in channels_last; torch.mm is MKL at about half that on AMD CPUs) measured in the same run.
The official part-swap loop side by side with ours, and bf16: bench/official_cosegmentation.py.

    python -m bench.cosegmentation [--quick] [--device cpu|cuda] [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.peak import conv_peak_gflops
from keepr.errors import cli_main
from keepr.fileio import write_text_atomic
from models.cosegmentation import make_tiny_cosegmentation
from models.cosegmentation.part_swap import SourceCache, no_tf32

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "cosegmentation" / "vox-256-10segments.yaml"
SWAP = [1, 2, 5]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_gflops(device, n=2048, seconds=2.0) -> float:
    """Best fp32 GEMM rate (GFLOP/s) of oneDNN (cuDNN on CUDA, TF32 off): n^3 as a 1x1 conv, see bench/peak.py."""
    return conv_peak_gflops(device, torch.float32, seconds=seconds, n=n)


def conv_flops(fn) -> int:
    """Conv FLOPs of ``fn()`` from the shapes it actually runs (torch's analytic FlopCounterMode: 2*MACs)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    counts = counter.get_flop_counts().get("Global", {})
    return int(sum(v for op, v in counts.items() if "convolution" in str(op)))


def swap_frames(model, source, driving, batch_size, cache):
    """Part-swap all frames against ``cache``; with ``cache=None`` the source goes through both modules again for
    each frame (no cache)."""
    outs = []
    cached = cache is not None
    for start in range(0, driving.shape[0], batch_size):
        batch = driving[start:start + batch_size]
        if not cached:
            src = source.expand(batch.shape[0], -1, -1, -1)
            with torch.no_grad(), no_tf32(source.device):
                seg = model.segment(src)
                cache = SourceCache(image=source, features=model.reconstruction_module.encode(src), seg=seg,
                                    parts=seg["segmentation"][:, 1:].sum(dim=1, keepdim=True))
        outs.append(model.swap_batch(cache, batch, SWAP)["prediction"])
    return torch.cat(outs)


def run_mode(model, source, driving, batch_size, cached, reps):
    """Best-of-``reps`` wall time per frame (ms) and the conv FLOPs per frame. With the cache, the one-time source
    preparation happens before timing (it is paid once per video; ``prepare_ms`` reports it)."""
    dev = source.device
    cache = model.prepare_source(source) if cached else None
    swap_frames(model, source, driving[:batch_size], batch_size, cache)  # Warm-up: kernel/primitive selection.
    flops_per_frame = conv_flops(
        lambda: swap_frames(model, source, driving[:batch_size], batch_size, cache)) / batch_size
    best = float("inf")
    for _ in range(reps):
        sync(dev)
        t0 = time.perf_counter()
        swap_frames(model, source, driving, batch_size, cache)
        sync(dev)
        best = min(best, time.perf_counter() - t0)
    return 1000 * best / driving.shape[0], flops_per_frame


@cli_main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="8 frames, one timed pass per mode")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=8, help="the large batch size")
    ap.add_argument("--frames", type=int, default=None, help="frames per timed pass (default 8 quick, 16 full)")
    ap.add_argument("--channels_last", type=int, default=1, help="1: NHWC activations (oneDNN/cuDNN friendly)")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    frames = args.frames or (args.batch if args.quick else 2 * args.batch)
    reps = 1 if args.quick else 2
    torch.manual_seed(0)
    model = make_tiny_cosegmentation(CONFIG, seed=0).to(device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    source = torch.rand(1, 3, 256, 256, device=device).contiguous(memory_format=fmt)
    driving = torch.rand(frames, 3, 256, 256, device=device).contiguous(memory_format=fmt)

    peak = matmul_gflops(device, seconds=1.0 if args.quick else 3.0)
    model.prepare_source(source)
    sync(device)
    t0 = time.perf_counter()
    model.prepare_source(source)
    sync(device)
    prepare_ms = 1000 * (time.perf_counter() - t0)
    rows = []
    for batch_size in (1, args.batch):
        for cached in (False, True):
            ms, flops = run_mode(model, source, driving, batch_size, cached, reps)
            gflops = flops / (ms / 1000) / 1e9
            rows.append({"batch": batch_size, "cache": cached, "ms_per_frame": ms, "gflop_per_frame": flops / 1e9,
                         "gflops": gflops, "fraction_of_matmul_peak": gflops / peak})
    peak2 = matmul_gflops(device, seconds=1.0 if args.quick else 3.0)  # The machine may be shared: measure twice.
    peak = max(peak, peak2)
    for r in rows:
        r["fraction_of_matmul_peak"] = r["gflops"] / peak
    base = next(r for r in rows if r["batch"] == 1 and not r["cache"])
    best = next(r for r in rows if r["batch"] == args.batch and r["cache"])
    result = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
              "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__, "frames": frames,
              "channels_last": bool(args.channels_last), "matmul_fp32_gflops": peak, "source_prepare_ms": prepare_ms,
              "modes": rows,
              "speedup_batch_cache_vs_b1_nocache": base["ms_per_frame"] / best["ms_per_frame"]}

    print(f"device {result['device_name']} threads {result['threads']}  oneDNN fp32 GEMM peak {peak:.1f} GFLOP/s")
    print(f"source cache: built once per video in {prepare_ms:.1f} ms")
    print(f"{'batch':>5} {'cache':>5} {'ms/frame':>9} {'GFLOP/frame':>11} {'GFLOP/s':>8} {'of peak':>7}")
    for r in rows:
        print(f"{r['batch']:>5} {str(r['cache']):>5} {r['ms_per_frame']:>9.1f} {r['gflop_per_frame']:>11.2f} "
              f"{r['gflops']:>8.1f} {100 * r['fraction_of_matmul_peak']:>6.1f}%")
    print(f"batch {args.batch} + cache vs batch 1 without cache: "
          f"{result['speedup_batch_cache_vs_b1_nocache']:.2f}x faster per frame")
    if args.out:
        write_text_atomic(args.out, json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
