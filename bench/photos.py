"""Benchmark the photo path: photos/s of ``infer.py --images`` on the shipped photos, with the tiny models.

    python -m bench.photos [--photos tests/fixtures/media/photos] [--copies 1] [--batch_size 8] [--device cpu]
        [--json FILE]

Models are the tests' tiny architectures (random-init generator and co-part model, an untrained encoder; built as
``models.tiny.make_tiny_models``, as for the tests' ``tiny_models`` fixture, with ``configs/infer/tiny.yaml``): speed,
not looks.
The folder (``--copies`` copies of ``--photos``) is anonymized twice in this process with the models loaded once:
``--batch_size`` photos per group (faces batched through encoder, generator and part swap) and ``--batch_size 1``
(one face at a time) for comparison; then a rerun into the first output shows the resume cost (everything skipped).
Prints photos/s and seconds per stage as JSON.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from anonymizer.cli import build_parser, settings_from_args
from anonymizer.photos import anonymize_images, list_images, load_models
from models.tiny import make_tiny_models

ROOT = Path(__file__).resolve().parents[1]


def settings_for(config: Path, batch_size: int, device: str):
    argv = ["--images", "unused", "--out", "unused", "--config", str(config), "--progress", "false",
            "--swap.batch_size", str(batch_size), "--swap.device", device]
    return settings_from_args(build_parser().parse_args(argv))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--photos", default=str(ROOT / "tests" / "fixtures" / "media" / "photos"))
    ap.add_argument("--copies", type=int, default=1, help="copies of the folder to anonymize")
    ap.add_argument("--batch_size", type=int, default=8, help="photos per group / faces per batch")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench_photos_") as tmp:
        tmp = Path(tmp)
        config = make_tiny_models(tmp / "models")["config"]
        src = tmp / "in"
        for c in range(args.copies):
            shutil.copytree(args.photos, src / f"copy{c}")
        n = len(list_images(src)[1])
        base = settings_for(config, args.batch_size, args.device)
        t0 = time.perf_counter()
        models = load_models(base.models, args.device)
        load_s = time.perf_counter() - t0
        # Warm-up (W spread estimate, dlib models, allocator) on one photo, not timed.
        first = list_images(src)
        anonymize_images(first[0] / first[1][0], tmp / "warm", base, models=models)
        results = {"photos": n, "device": args.device, "load_models_s": round(load_s, 3), "runs": {}}
        for label, bs in ((f"batch_size {args.batch_size}", args.batch_size), ("batch_size 1", 1)):
            s = settings_for(config, bs, args.device)
            out = tmp / f"out_{bs}"
            t0 = time.perf_counter()
            report = anonymize_images(src, out, s, models=models)
            sec = time.perf_counter() - t0
            t = report["totals"]
            results["runs"][label] = {
                "seconds": round(sec, 3), "photos_per_second": round(n / sec, 3),
                "faces": t["faces"], "by_swap": t["by_swap"], "no_face": t["no_face"], "failed": t["failed"],
                "stages": {k: v["seconds"] for k, v in t["this_run"]["stages"].items()}}
        t0 = time.perf_counter()
        anonymize_images(src, tmp / f"out_{args.batch_size}", base, models=models)
        results["rerun_all_skipped_s"] = round(time.perf_counter() - t0, 3)
    print(json.dumps(results, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
