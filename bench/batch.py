"""Benchmark ``python -m anonymizer.batch``: videos/s and load balance (max rank busy time / mean) for 1 and 2
processes.

    python -m bench.batch [--clips 4] [--frames 8] [--processes 1,2] [--threads 1] [--json FILE] [--work DIR]

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

from bench import failure_line
from keepr.errors import KeeprError, cli_main
from models.tiny import make_tiny_models
from tests.support.clips import first_frames

ROOT = Path(__file__).resolve().parents[1]

SOURCES = ("bbaf2n.mpg", "video_01.mp4")


def make_clips(folder: Path, n: int, frames: int) -> None:
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
        raise KeeprError(f"anonymizer.batch failed ({processes} process(es)): {failure_line(r.stderr)}")
    s = json.loads((out / "summary.json").read_text())
    busy = [x["busy_seconds"] for x in s["ranks"]]
    return {"processes": processes, "videos": s["done"], "frames": s["frames_done"], "wall_seconds": round(wall, 2),
            "run_seconds": s["seconds"], "videos_per_second": round(s["done"] / wall, 4),
            "frames_per_second": round(s["frames_done"] / wall, 3), "rank_busy_seconds": busy,
            "load_balance": s["load_balance"], "inputs_per_rank": [x["inputs"] for x in s["ranks"]]}


@cli_main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clips", type=int, default=4)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--processes", default="1,2")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        config = Path(make_tiny_models(work / "models")["config"])
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
