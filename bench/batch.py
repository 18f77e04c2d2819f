"""Benchmark ``python -m anonymizer.batch``: videos/s and load balance (max rank busy time / mean) for 1 and 2 processes.

    python bench/batch.py [--clips 4] [--frames 8] [--processes 1,2] [--threads 1] [--json FILE] [--work DIR]

The clips are the first ``--frames`` frames of the bundled videos that the tiny config can track (bbaf2n.mpg,
video_01.mp4), alternated up to ``--clips`` clips; the models are the tiny random-init ones (speed does not depend
on the weights). Each process count runs into a fresh output folder, CPU DDP (``--trainer.strategy ddp``) for more
than one process, ``--threads`` torch threads per rank. Figures from ``summary.json``: videos/s over the whole run
(start-up, model loading and the merge included), the ranks' busy times and their balance.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SOURCES = ("bbaf2n.mpg", "video_01.mp4")


def make_models(work: Path) -> Path:
    """Tiny generator, co-part model and untrained encoder; returns an infer config pointing at them."""
    import torch
    import yaml

    from models.cosegmentation import make_tiny_cosegmentation
    from models.encoder import Encoder, save_encoder
    from models.stylegan2 import make_tiny_generator

    work.mkdir(parents=True, exist_ok=True)
    G = make_tiny_generator(seed=0)
    G.save(work / "generator_tiny.safetensors")
    make_tiny_cosegmentation(config=str(ROOT / "configs/cosegmentation/tiny.yaml"), seed=0).save(
        work / "cosegmentation_tiny.pth.tar")
    cfg = yaml.safe_load((ROOT / "configs/encoder/tiny.yaml").read_text())["model"]["encoder"]
    torch.manual_seed(0)
    enc = Encoder(w_dim=G.w_dim, num_ws=G.num_ws, img_resolution=G.img_resolution, **cfg)
    save_encoder(enc, work / "encoder.safetensors", work / "generator_tiny.safetensors")
    config = work / "infer.yaml"
    config.write_text((ROOT / "configs/infer/tiny.yaml").read_text()
                      .replace("outputs/tiny/generator_tiny.safetensors", str(work / "generator_tiny.safetensors"))
                      .replace("outputs/encoder_tiny_demo/encoder.safetensors", str(work / "encoder.safetensors"))
                      .replace("outputs/tiny/cosegmentation_tiny.pth.tar", str(work / "cosegmentation_tiny.pth.tar")))
    return config


def make_clips(folder: Path, n: int, frames: int) -> None:
    from tests.support.clips import first_frames

    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        src = ROOT / "tests/fixtures/media/videos" / SOURCES[k % len(SOURCES)]
        first_frames(src, folder / f"clip{k:02d}.mp4", frames)


def run(clips: Path, out: Path, config: Path, processes: int, threads: int) -> dict:
    cmd = [sys.executable, "-m", "anonymizer.batch", "--inputs", str(clips), "--out", str(out), "--config",
           str(config), "--progress", "false", "--threads", str(threads), "--trainer.accelerator", "cpu",
           "--trainer.devices", str(processes)]
    if processes > 1:
        cmd += ["--trainer.strategy", "ddp"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"anonymizer.batch failed ({processes} process(es)): {r.stderr[-2000:]}")
    s = json.loads((out / "summary.json").read_text())
    busy = [x["busy_seconds"] for x in s["ranks"]]
    return {"processes": processes, "videos": s["done"], "frames": s["frames_done"], "wall_seconds": round(wall, 2),
            "run_seconds": s["seconds"], "videos_per_second": round(s["done"] / wall, 4),
            "frames_per_second": round(s["frames_done"] / wall, 3), "rank_busy_seconds": busy,
            "load_balance": s["load_balance"], "inputs_per_rank": [x["inputs"] for x in s["ranks"]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clips", type=int, default=4)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--processes", default="1,2")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        config = make_models(work / "models")
        make_clips(work / "clips", args.clips, args.frames)
        rows = []
        for p in [int(v) for v in args.processes.split(",")]:
            row = run(work / "clips", work / f"out_{p}", config, p, args.threads)
            rows.append(row)
            print(f"{p} process(es): {row['videos']} videos, {row['frames']} frames in {row['wall_seconds']} s: "
                  f"{row['videos_per_second']} videos/s, {row['frames_per_second']} frames/s; rank busy "
                  f"{row['rank_busy_seconds']} s, load balance (max/mean) {row['load_balance']}")
    result = {"cpu_count": os.cpu_count(), "clips": args.clips, "frames": args.frames, "threads": args.threads,
              "runs": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
