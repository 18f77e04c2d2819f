"""Peak memory of the evaluation: flat in video length (issue 13).

    python -m bench.eval_memory [--clip tests/fixtures/media/videos/bbaf2n.mpg] [--repeat 4] [--methods blur,none]
                                [--keepr]

The clip and the same clip repeated ``--repeat`` times (re-encoded back to back with PyAV, as ``bench.infer`` does)
are each evaluated by ``python -m eval.run`` in a fresh subprocess; the peak RSS of each (``ru_maxrss`` of the child)
must agree within 10%: the evaluation streams frames instead of holding clips in memory. ``--keepr`` adds the keepr
method with the tiny models (``models.tiny``). Exit status 1 when the ratio is over 1.10.
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.infer import repeat_clip
from models.tiny import make_tiny_models

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 1.10


def peak_rss_mb(argv: list[str]) -> tuple[float, float]:
    """Run ``python -m eval.run ARGV`` in a fresh process; (its peak RSS in MB, seconds)."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    t0 = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    r = subprocess.run([sys.executable, "-m", "eval.run", *argv], cwd=ROOT, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"error: eval.run failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # RUSAGE_CHILDREN holds the largest child's peak so far: the runs go shortest first, so this run's peak.
    return max(after, before) / 1024.0, time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clip", default=str(ROOT / "tests" / "fixtures" / "media" / "videos" / "bbaf2n.mpg"))
    p.add_argument("--repeat", type=int, default=4)
    p.add_argument("--methods", default="blur,none")
    p.add_argument("--keepr", action="store_true", help="add the keepr method with the tiny models")
    p.add_argument("--max_frames", type=int, default=None, help="use only the clip's first frames")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_eval_memory_") as tmp:
        work = Path(tmp)
        methods, extra = a.methods, []
        if a.keepr:
            m = make_tiny_models(work / "models")
            methods += ",keepr"
            extra = ["--config", str(m["config"])]
        short, long = work / "clip.mp4", work / f"clip_x{a.repeat}.mp4"
        n1 = repeat_clip(Path(a.clip), short, 1, a.max_frames)
        n4 = repeat_clip(Path(a.clip), long, a.repeat, a.max_frames)
        results = {}
        for name, video, n in (("clip", short, n1), (f"clip_x{a.repeat}", long, n4)):
            print(f"evaluating {name} ({n} frames, methods {methods}) ...", flush=True)
            results[name] = peak_rss_mb(["--videos", str(video), "--methods", methods, "--no_progress",
                                         "--out", str(work / f"out_{name}"), *extra])
    (base, t1), (rep, t4) = results["clip"], results[f"clip_x{a.repeat}"]
    ratio = rep / base
    print(f"peak RSS: {base:.0f} MB for {n1} frames ({t1:.0f} s), {rep:.0f} MB for {n4} frames ({t4:.0f} s): "
          f"ratio {ratio:.3f} -> {'OK' if ratio <= LIMIT else 'FAIL'} (limit {LIMIT:.2f})")
    return 0 if ratio <= LIMIT else 1


if __name__ == "__main__":
    sys.exit(main())
