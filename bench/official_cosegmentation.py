"""Part swap, ours vs the official loop, side by side in one run (vox-10 256 px, the same random weights).

    python -m bench.official_cosegmentation [--quick] [--frames 16] [--rounds 3] [--tune_allocator] [--json FILE]

The official loop, re-implemented from the authors' published part-swap demo (motion-cosegmentation ``part_swap.py``
``make_video``): the source is segmented once; then for every driving frame, one at a time (batch 1), the driving
frame is segmented, the reconstruction module encodes the source *and* the driving frame again, warps the source
features by the part motion, multiplies by the visibility map, blends with the chosen part mask and decodes -- with the
module as trained (BatchNorm layers, nearest upsampling then 3x3 conv), fp32, NCHW. Ours: PartSwapper (source cached,
reconstruction folded, channels_last) at fp32 batch 1, fp32 batch N and bf16 batch N (bf16 only on CPUs with native
bf16 or on CUDA). Modes run interleaved, ``--rounds`` times; the table shows the median ms/frame, the ratio to the
official loop, and the conv GFLOP/s as a fraction of the oneDNN conv peak (bench/peak.py) of the mode's dtype.
Accuracy: ours fp32 vs the official loop (max abs), bf16 vs fp32 (max / mean abs, PSNR of uint8 frames, fraction of
pixels off by more than 1 and 2 levels). ``--tune_allocator`` applies keepr.precision.tune_allocator() first (run the
command with and without it to see the allocator's share). Not a test.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.peak import conv_peak_gflops
from keepr.errors import cli_main
from keepr.precision import cpu_bf16_native, tune_allocator
from models.cosegmentation import PartSwapper, make_tiny_cosegmentation
from models.cosegmentation.part_swap import no_tf32

ROOT = Path(__file__).resolve().parents[1]

CONFIG = ROOT / "configs" / "cosegmentation" / "vox-256-10segments.yaml"
SWAP = [1, 2, 5]


@torch.no_grad()
def official_part_swap(model, source, driving, swap_index=SWAP):
    """The authors' make_video loop (see the module docstring): [T,3,H,W] in [0,1] -> [T,3,H,W]."""
    seg_mod, rec = model.segmentation_module, model.reconstruction_module
    out = []
    with no_tf32(source.device):
        seg_source = seg_mod(source)                                      # segmented once
        for t in range(driving.shape[0]):
            frame = driving[t:t + 1]
            seg_target = seg_mod(frame)
            enc_source = rec.encode(source)                               # recomputed every frame
            enc_target = rec.encode(frame)
            deformation = rec.deformation(seg_target, seg_source)
            warped = rec.deform_input(enc_source, deformation)
            if rec.estimate_visibility:
                vis = 1 - seg_source["segmentation"][:, 1:].sum(1, keepdim=True) * \
                    (1 - seg_target["segmentation"][:, 1:].sum(1, keepdim=True))
                warped = warped * vis
            blend = seg_target["segmentation"][:, swap_index].sum(1, keepdim=True)
            out.append(rec.decode(enc_target * (1 - blend) + warped * blend))
    return torch.cat(out)


def conv_flops(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    counts = counter.get_flop_counts().get("Global", {})
    return float(sum(v for op, v in counts.items() if "convolution" in str(op)))


def accuracy(a: torch.Tensor, b: torch.Tensor) -> dict:
    """a, b: [T,3,H,W] in [0,1]; errors of b against a, on floats and on uint8 frames."""
    d = (a - b).abs()
    ua, ub = (a.clamp(0, 1) * 255).round(), (b.clamp(0, 1) * 255).round()
    du = (ua - ub).abs()
    mse = ((ua - ub) ** 2).mean().item()
    return {"max_abs": d.max().item(), "mean_abs": d.mean().item(),
            "psnr_uint8": float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(255.0 ** 2 / mse)).item(),
            "frac_off_gt1": (du > 1).float().mean().item(), "frac_off_gt2": (du > 2).float().mean().item()}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@cli_main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="8 frames, 2 rounds")
    ap.add_argument("--frames", type=int, default=None, help="driving frames per timed pass (default 16, quick 8)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 3, quick 2)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tune_allocator", action="store_true", help="keepr.precision.tune_allocator() first")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    alloc = tune_allocator() if args.tune_allocator else {"applied": False}
    device = torch.device(args.device)
    frames = args.frames or (8 if args.quick else 16)
    rounds = args.rounds or (2 if args.quick else 3)

    model = make_tiny_cosegmentation(CONFIG, seed=0).to(device)
    g = torch.Generator().manual_seed(0)
    source = torch.rand(1, 3, 256, 256, generator=g).to(device)
    driving = torch.rand(frames, 3, 256, 256, generator=g).to(device)
    low = "bf16" if (device.type == "cpu" and cpu_bf16_native()) or \
        (device.type == "cuda" and torch.cuda.is_bf16_supported()) else None

    swappers = {"ours fp32 b1": PartSwapper(model, source, SWAP, batch_size=1, precision="32"),
                f"ours fp32 b{args.batch}": PartSwapper(model, source, SWAP, batch_size=args.batch, precision="32")}
    if low:
        swappers[f"ours {low} b1"] = PartSwapper(model, source, SWAP, batch_size=1, precision=low)
        swappers[f"ours {low} b{args.batch}"] = PartSwapper(model, source, SWAP, batch_size=args.batch,
                                                            precision=low)
    modes = {"official loop (fp32 b1)": lambda: official_part_swap(model, source, driving)}
    modes.update({name: (lambda s=s: s(driving)) for name, s in swappers.items()})

    outputs, times = {}, {name: [] for name in modes}
    with torch.inference_mode():
        for name, fn in modes.items():  # warm-up (primitive selection) and the outputs for the accuracy
            outputs[name] = fn().float().cpu()
        flops = {name: conv_flops(lambda fn=fn: fn()) / frames for name, fn in modes.items()}
        for _ in range(rounds):
            for name, fn in modes.items():
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                times[name].append(1000 * (time.perf_counter() - t0) / frames)
    peaks = {"fp32": conv_peak_gflops(device, torch.float32)}
    if low:
        peaks[low] = conv_peak_gflops(device, torch.bfloat16)

    official = "official loop (fp32 b1)"
    ms = {name: statistics.median(v) for name, v in times.items()}
    rows = []
    for name in modes:
        dt = low if (low and low in name) else "fp32"
        gflops = flops[name] / 1e9 / (ms[name] / 1000)
        rows.append({"mode": name, "ms_per_frame": ms[name], "all_ms": times[name],
                     "speedup_vs_official": ms[official] / ms[name], "gflop_per_frame": flops[name] / 1e9,
                     "gflops": gflops, "fraction_of_peak": gflops / peaks[dt], "peak_dtype": dt})
    acc = {"ours fp32 vs official": accuracy(outputs[official], outputs[f"ours fp32 b{args.batch}"]),
           f"ours fp32 b1 vs b{args.batch}": accuracy(outputs["ours fp32 b1"], outputs[f"ours fp32 b{args.batch}"])}
    if low:
        acc[f"{low} vs fp32 (b{args.batch})"] = accuracy(outputs[f"ours fp32 b{args.batch}"],
                                                          outputs[f"ours {low} b{args.batch}"])
    result = {"device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "cpu_bf16": cpu_bf16_native(), "frames": frames, "rounds": rounds, "allocator": alloc,
              "peak_gflops": peaks, "modes": rows, "accuracy": acc,
              "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}

    print(f"part swap vox-10 256 px, {frames} frames, device {device}, threads {torch.get_num_threads()}, "
          f"allocator tuned: {alloc['applied']}; oneDNN conv peak " +
          ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items()))
    print(f"\n| mode | ms/frame (median of {rounds}) | vs official | GFLOP/frame | GFLOP/s | % of conv peak |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['mode']} | {r['ms_per_frame']:.0f} | {r['speedup_vs_official']:.2f}x | "
              f"{r['gflop_per_frame']:.1f} | {r['gflops']:.0f} | "
              f"{100 * r['fraction_of_peak']:.0f}% ({r['peak_dtype']}) |")
    print("\n| accuracy | max abs | mean abs | PSNR uint8 (dB) | pixels off > 1 level | > 2 levels |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for k, a in acc.items():
        print(f"| {k} | {a['max_abs']:.2e} | {a['mean_abs']:.2e} | {a['psnr_uint8']:.1f} | "
              f"{100 * a['frac_off_gt1']:.4f}% | {100 * a['frac_off_gt2']:.4f}% |")
    print(f"\npeak RSS {result['max_rss_mb']:.0f} MB")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
