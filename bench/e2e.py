"""Real-size end to end at each precision: frames/s per stage, end to end, peak memory, bf16 vs 32 per-frame PSNR.

    python -m bench.e2e [--quick] [--precision 32,bf16] [--frames 24] [--repeat 2] [--batch 8] [--compare_batch]
        [--device cpu] [--clip tests/fixtures/media/videos/bbaf2n.mpg] [--json FILE]

Full-size random models built into a temporary directory: the FFHQ-256 generator (configs/generator/ffhq256.yaml),
the ffhq256 encoder (configs/encoder/ffhq256.yaml: IR-SE-50, w+) and the vox-10 co-part model
(configs/cosegmentation/vox-256-10segments.yaml). Loaded back through the public APIs (load_generator, load_encoder,
load_cosegmentation), then for each precision in a fresh subprocess: the clip's frames are decoded, cropped around a
fixed face box with the co-part framing (anonymizer.crop), one virtual face is made (encoder on the first crop, then
the generator at batch 8 as for the candidates: the ``virtual_face`` stage), the face is part-swapped into every crop
(PartSwapper, ``--batch`` frames at a time) and pasted back (anonymizer.blend). Frames/s per stage and end to end
(decode to pasted frame; model loading excluded; runs interleaved ``--rounds`` times, the median run shown), peak RSS,
and -- repeated with the clip ``--repeat`` times as long
-- whether memory stays flat (ratio <= 1.10). The bf16 output frames are compared with the 32 ones (per-frame PSNR,
pixels off by > 2 levels). Random weights: speed and memory do not depend on them; the generator's random-weight
outputs leave [-1, 1], so its error is judged on the parity fixture in tests/test_precision.py.

This does not call anonymizer/pipeline.py (being rewritten); once the pipeline has its ``precision`` setting the
bench should run infer.py instead. Not a test. ``--device cuda --precision 32,16,bf16`` is what bench/gpu_check.sh runs.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from bench import failure_line
from keepr.errors import KeeprError, cli_main

ROOT = Path(__file__).resolve().parents[1]

FACE_BOX = (0.33, 0.22, 0.67, 0.66)  # fraction of (width, height): the speaker's face in the GRID clip bbaf2n.mpg


def build_models(work: Path) -> dict:
    from models.cosegmentation import make_tiny_cosegmentation  # heavy (torch): only in build_models()
    from models.encoder import Encoder, save_encoder  # heavy (torch): only in build_models()
    from models.stylegan2.loaders import build_generator, load_generator_config  # heavy (torch)

    work.mkdir(parents=True, exist_ok=True)
    gen = work / "generator.safetensors"
    G = build_generator(load_generator_config("ffhq256"), seed=0)
    G.save(gen)
    cfg = yaml.safe_load((ROOT / "configs" / "encoder" / "ffhq256.yaml").read_text())["model"]["encoder"]
    enc = Encoder(w_dim=G.w_dim, num_ws=G.num_ws, **cfg)
    enc.w_avg.copy_(G.w_avg)
    enc_path = save_encoder(enc, work / "encoder.safetensors", gen)
    coseg_cfg = ROOT / "configs" / "cosegmentation" / "vox-256-10segments.yaml"
    seg = work / "cosegmentation.pth.tar"
    make_tiny_cosegmentation(config=str(coseg_cfg), seed=0).save(seg)
    return {"generator": str(gen), "encoder": str(enc_path), "cosegmentation": str(seg),
            "cosegmentation_config": str(coseg_cfg)}


def child(args: dict) -> dict:
    """One run at one precision (fresh process: clean peak RSS, allocator state and oneDNN caches)."""
    import torch  # heavy (torch): only in child()

    from anonymizer.blend import feather_mask, paste  # heavy (cv2): only in child()
    from anonymizer.crop import crop_box, crop_frame  # heavy (cv2): only in child()
    from anonymizer.video import VideoReader  # heavy (av): only in child()
    from keepr.precision import autocast, check_precision, tune_allocator  # heavy (torch): only in child()
    from models.cosegmentation import PartSwapper, load_cosegmentation  # heavy (torch): only in child()
    from models.encoder import load_encoder  # heavy (torch): only in child()
    from models.stylegan2 import load_generator  # heavy (torch): only in child()

    alloc = tune_allocator() if args["tune_allocator"] else {"applied": False}
    device = torch.device(args["device"])
    prec = check_precision(args["precision"], device)
    m = args["models"]
    G = load_generator(m["generator"], device=device)
    enc = load_encoder(m["encoder"], m["generator"], device=device)
    coseg = load_cosegmentation(m["cosegmentation"], m["cosegmentation_config"], device=device)
    size = coseg.img_size

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    stages = {k: 0.0 for k in ("decode", "crop", "virtual_face", "swap", "paste")}
    n = 0
    t_start = time.perf_counter()
    reader = VideoReader(args["clip"])
    frames = []
    for _ in range(args["repeat"]):
        for f in reader:
            if f.index >= args["frames"]:
                break
            frames.append(f.image)
    stages["decode"] = time.perf_counter() - t_start
    h, w = frames[0].shape[:2]
    box = crop_box((FACE_BOX[0] * w, FACE_BOX[1] * h, FACE_BOX[2] * w, FACE_BOX[3] * h))
    mask = feather_mask(None, size)

    with torch.inference_mode():
        t0 = time.perf_counter()
        first, _ = crop_frame(frames[0], box, size)
        x = torch.from_numpy(first).permute(2, 0, 1)[None].float().div(127.5).sub(1).to(device)
        with autocast(device, prec):
            ws = enc(x).float()
            ws = ws.repeat(8, 1, 1) + 0.1 * torch.randn(8, *ws.shape[1:], generator=torch.Generator().manual_seed(0)
                                                        ).to(device)
            imgs = G.synthesis(ws, noise_mode="const")
        sync()
        source = ((imgs[:1].clamp(-1, 1) + 1) / 2).float()
        stages["virtual_face"] = time.perf_counter() - t0
        swapper = PartSwapper(coseg, source, [1, 2, 5], batch_size=args["batch"], precision=prec)
        outs = []
        for start in range(0, len(frames), args["batch"]):
            batch = frames[start:start + args["batch"]]
            t0 = time.perf_counter()
            crops = [crop_frame(f, box, size) for f in batch]
            drv = torch.from_numpy(np.stack([c for c, _ in crops])).permute(0, 3, 1, 2).float().div(255).to(device)
            t1 = time.perf_counter()
            res = swapper(drv)
            sync()
            res = (res.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
            t2 = time.perf_counter()
            for f, (_, inv), r in zip(batch, crops, res):
                outs.append(paste(f, r, inv, mask))
            t3 = time.perf_counter()
            stages["crop"] += t1 - t0
            stages["swap"] += t2 - t1
            stages["paste"] += t3 - t2
        n = len(outs)
    total = time.perf_counter() - t_start
    if args.get("save"):
        np.save(args["save"], np.stack(outs))
    peak_gpu = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None
    return {"precision": prec, "batch": args["batch"], "frames": n, "seconds": total, "allocator": alloc,
            "stages": {k: {"seconds": v, "per_second": (n if k != "virtual_face" else 8) / v if v else None}
                       for k, v in stages.items()},
            "fps": n / total, "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "gpu_peak_mb": peak_gpu}


def run_child(args: dict) -> dict:
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-m", "bench.e2e", "--_child", json.dumps(args)],
                       capture_output=True, text=True, cwd=ROOT, env=env)
    if r.returncode != 0:
        raise KeeprError(f"e2e run failed ({args['precision']}): {failure_line(r.stderr)}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def psnr_frames(a, b) -> list[float]:
    out = []
    for x, y in zip(a, b):
        mse = np.mean((x.astype(np.float64) - y.astype(np.float64)) ** 2)
        out.append(float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse))
    return out


@cli_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clip", default=str(ROOT / "tests" / "fixtures" / "media" / "videos" / "bbaf2n.mpg"))
    p.add_argument("--precision", default=None, help="comma-separated (default: 32 and bf16 where it is native)")
    p.add_argument("--frames", type=int, default=None, help="frames of the clip used (default 24, quick 16)")
    p.add_argument("--repeat", type=int, default=2, help="the long run uses the frames this many times")
    p.add_argument("--batch", type=int, default=8, help="part-swap batch size")
    p.add_argument("--compare_batch", action="store_true", help="also run the lowest precision at batch 1")
    p.add_argument("--tune_allocator", type=int, default=1, help="1: keepr.precision.tune_allocator() first")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved rounds per run, median shown (default 3, quick 1)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._child:
        print(json.dumps(child(json.loads(a._child))))
        return 0
    from keepr.precision import cpu_bf16_native  # heavy (torch): only in main()
    if a.precision is None:
        a.precision = "32,bf16" if (a.device == "cpu" and cpu_bf16_native()) or a.device.startswith("cuda") else "32"
    precisions = a.precision.split(",")
    frames = a.frames or (16 if a.quick else 24)
    a.rounds = a.rounds or (1 if a.quick else 3)
    with tempfile.TemporaryDirectory(prefix="bench_e2e_") as tmp:
        work = Path(tmp)
        print("building full-size random models ...", flush=True)
        models = build_models(work / "models")
        base = {"models": models, "clip": a.clip, "frames": frames, "device": a.device, "batch": a.batch,
                "tune_allocator": bool(a.tune_allocator)}
        jobs = {}
        for prec in precisions:
            jobs[prec] = {**base, "precision": prec, "repeat": 1, "save": str(work / f"out_{prec}.npy")}
        if a.compare_batch:
            jobs[precisions[-1] + " b1"] = {**base, "precision": precisions[-1], "repeat": 1, "batch": 1}
        tries = {k: [] for k in jobs}
        for rnd in range(a.rounds):  # interleaved: a load change on a shared machine hits every run alike
            for name, job in jobs.items():
                print(f"round {rnd + 1}/{a.rounds}: {name}, {frames} frames ...", flush=True)
                tries[name].append(run_child(job))
        runs = {k: sorted(v, key=lambda r: r["fps"])[len(v) // 2] for k, v in tries.items()}  # median run
        for k, v in tries.items():
            runs[k]["fps_all"] = [round(r["fps"], 3) for r in v]
        outputs = {prec: np.load(jobs[prec]["save"]) for prec in precisions}
        for prec in precisions:
            print(f"{prec}: {a.repeat} x {frames} frames (memory) ...", flush=True)
            runs[prec + " long"] = run_child({**base, "precision": prec, "repeat": a.repeat})

    ref = precisions[0]
    print(f"\nend to end, {frames} frames of {Path(a.clip).name}, device {a.device}, swap batch {a.batch}, "
          f"allocator tuned: {bool(a.tune_allocator)} (full-size random models; model loading excluded)\n")
    print("| run | decode f/s | crop f/s | virtual face img/s | swap f/s | paste f/s | end to end f/s | vs first | "
          "peak RSS MB | long run RSS ratio |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in runs.items():
        if name.endswith(" long"):
            continue
        st = r["stages"]
        long = runs.get(name + " long")
        ratio = f"{long['max_rss_mb'] / r['max_rss_mb']:.3f}" if long else "-"
        mem = f"{r['max_rss_mb']:.0f}" + (f" (GPU {r['gpu_peak_mb']:.0f})" if r.get("gpu_peak_mb") else "")
        print(f"| {name} (b{r['batch']}) | " + " | ".join(f"{st[k]['per_second']:.1f}" for k in
                                                        ("decode", "crop", "virtual_face", "swap", "paste")) +
              f" | {r['fps']:.2f} | {r['fps'] / runs[ref]['fps']:.2f}x | {mem} | {ratio} |")
    acc = {}
    for prec in precisions[1:]:
        ps = psnr_frames(outputs[ref], outputs[prec])
        off2 = float(np.mean(np.abs(outputs[ref].astype(np.int16) - outputs[prec].astype(np.int16)) > 2))
        acc[prec] = {"psnr_min": min(ps), "psnr_median": float(np.median(ps)), "frac_off_gt2": off2}
        print(f"\n{prec} vs {ref}, whole frames: per-frame PSNR min {min(ps):.1f} dB, median {np.median(ps):.1f} dB; "
              f"pixels off by > 2 levels {100 * off2:.4f}%")
    flat = all(runs[k + " long"]["max_rss_mb"] / runs[k]["max_rss_mb"] <= 1.10 for k in precisions)
    print(f"memory flat in video length (long/short peak RSS <= 1.10): {'yes' if flat else 'NO'}")
    if a.json:
        Path(a.json).write_text(json.dumps({"runs": runs, "accuracy": acc, "memory_flat": flat}, indent=1))
    return 0 if flat else 1


if __name__ == "__main__":
    sys.exit(main())
