"""Benchmark infer: frames/s of every stage at 256 px face crops, and peak memory vs. video length.

    python -m bench.infer [--quick] [--clip tests/fixtures/media/videos/bbaf2n.mpg] [--repeat 4] [--crop_size 256]
        [--cosegmentation_config configs/cosegmentation/vox-256-10segments.yaml] [--device cpu] [--json FILE]

Models are random-init (speed and memory do not depend on the weights): the tiny generator, an untrained encoder
exported for it, and a co-part model of ``--cosegmentation_config`` (default: the tiny architecture with its crop size
set to ``--crop_size``; give the official vox-256 config to time the real network, ~10 s/frame on 2 CPU cores).

Memory: the clip and the same clip repeated ``--repeat`` times (made with PyAV) are each anonymized in a fresh
subprocess; their peak RSS (``ru_maxrss``) must agree within 10%, i.e. memory does not grow with video length.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from anonymizer.pipeline import InferSettings, anonymize_video
from anonymizer.video import VideoReader
from anonymizer.video_writer import VideoWriter
from bench import failure_line
from keepr.errors import KeeprError, cli_main
from models.tiny import make_tiny_models

ROOT = Path(__file__).resolve().parents[1]

STAGES = ("decode", "detect", "track", "virtual_face", "crop", "swap", "paste", "encode")


def repeat_clip(src: Path, dst: Path, times: int, max_frames: int | None = None) -> int:
    """Re-encode ``src`` (its first ``max_frames`` frames) ``times`` times back to back into one H.264 mp4 (video
    only); returns its frame count."""
    r = VideoReader(src)
    n = 0
    with VideoWriter(dst, r.width, r.height, r.fps, preset="veryfast", audio="none") as w:
        for _ in range(times):
            for f in r:
                if max_frames is not None and f.index >= max_frames:
                    break
                w.write(f.image)
                n += 1
    return n


def child(video: str, out: str, settings_json: str) -> None:
    """Run one anonymization and print its stage timings and peak RSS as JSON (called in a fresh process)."""
    settings = InferSettings.from_dict(json.loads(settings_json))
    t0 = time.perf_counter()
    rep = anonymize_video(video, out, settings)
    print(json.dumps({"frames": rep["totals"]["frames"], "seconds": time.perf_counter() - t0,
                      "stages": rep["totals"]["stages"],
                      "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}))


def run_child(video: Path, out: Path, settings: dict) -> dict:
    r = subprocess.run([sys.executable, "-m", "bench.infer", "--_child", str(video), str(out), json.dumps(settings)],
                       capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise KeeprError(f"benchmark run failed on {video}: {failure_line(r.stderr)}")
    return json.loads(r.stdout.strip().splitlines()[-1])


@cli_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clip", default=str(ROOT / "tests" / "fixtures" / "media" / "videos" / "bbaf2n.mpg"))
    p.add_argument("--repeat", type=int, default=4, help="the long clip is the clip repeated this many times")
    p.add_argument("--crop_size", type=int, default=256, help="co-part crop size of the default tiny architecture")
    p.add_argument("--cosegmentation_config", default=None, help="time this co-part architecture instead")
    p.add_argument("--device", default="cpu")
    p.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--max_frames", type=int, default=None, help="use only the clip's first frames")
    p.add_argument("--quick", action="store_true", help="short run: the clip's first 25 frames")
    p.add_argument("--_child", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._child:
        child(*a._child)
        return 0

    if a.quick and a.max_frames is None:
        a.max_frames = 25
    with tempfile.TemporaryDirectory(prefix="bench_infer_") as tmp:
        work = Path(a.work or tmp)
        paths = make_tiny_models(work / "models", a.crop_size, cosegmentation_config=a.cosegmentation_config)
        models = {k: paths[k] for k in ("generator", "encoder", "cosegmentation", "cosegmentation_config")}
        short, long = work / "clip.mp4", work / f"clip_x{a.repeat}.mp4"
        n1 = repeat_clip(Path(a.clip), short, 1, a.max_frames)
        n4 = repeat_clip(Path(a.clip), long, a.repeat, a.max_frames)
        settings = {"models": models, "progress": False, "detect": {"upsample": 0, "every": 1},
                    "swap": {"device": a.device, "batch_size": 8}, "encode": {"preset": "medium"}}
        results = {}
        for name, video in (("clip", short), (f"clip_x{a.repeat}", long)):
            print(f"anonymizing {name} ({n1 if name == 'clip' else n4} frames) ...", flush=True)
            results[name] = run_child(video, work / f"out_{name}", settings)

    base, rep = results["clip"], results[f"clip_x{a.repeat}"]
    ratio = rep["max_rss_mb"] / base["max_rss_mb"]
    coseg = a.cosegmentation_config or f"tiny architecture at {a.crop_size} px"
    print(f"\nstage frames/s ({base['frames']} frames, {coseg}, device {a.device}; "
          f"per face crop for crop/swap/paste, per virtual face for virtual_face):")
    for s in STAGES:
        st = base["stages"].get(s)
        if st:
            print(f"  {s:13s} {st['per_second'] or 0:10.2f}/s   ({st['seconds']:.2f} s for {st['items']})")
    print(f"  {'overall':13s} {base['frames'] / base['seconds']:10.2f} frames/s (models loading included)")
    print(f"\npeak RSS: {base['max_rss_mb']:.0f} MB for {base['frames']} frames, {rep['max_rss_mb']:.0f} MB for "
          f"{rep['frames']} frames: ratio {ratio:.3f} -> {'OK' if ratio <= 1.10 else 'FAIL'} (limit 1.10)")
    if a.json:
        Path(a.json).write_text(json.dumps({"results": results, "rss_ratio": ratio, "coseg": coseg}, indent=1))
    return 0 if ratio <= 1.10 else 1


if __name__ == "__main__":
    sys.exit(main())
