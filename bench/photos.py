"""Benchmark the photo path: photos/s of ``infer.py --images`` on the shipped photos, with the tiny models.

    python bench/photos.py [--photos tests/fixtures/media/photos] [--copies 1] [--batch_size 8] [--device cpu]
        [--json FILE]

Models are the tests' tiny architectures (random-init generator and co-part model, an untrained encoder; built as
``tests/conftest.py``'s ``tiny_models`` fixture builds them, with ``configs/infer/tiny.yaml``): speed, not looks.
The folder (``--copies`` copies of ``--photos``) is anonymized twice in this process with the models loaded once:
``--batch_size`` photos per group (faces batched through encoder, generator and part swap) and ``--batch_size 1``
(one face at a time) for comparison; then a rerun into the first output shows the resume cost (everything skipped).
Prints photos/s and seconds per stage as JSON.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_tiny_models(d: Path) -> Path:
    """The tests' tiny models in ``d`` and an infer config pointing at them (returns the config path)."""
    import torch
    import yaml

    from models.cosegmentation import make_tiny_cosegmentation
    from models.encoder import Encoder, save_encoder
    from models.stylegan2 import make_tiny_generator

    d.mkdir(parents=True, exist_ok=True)
    G = make_tiny_generator(seed=0)
    G.save(d / "generator_tiny.safetensors")
    make_tiny_cosegmentation(config=str(ROOT / "configs" / "cosegmentation" / "tiny.yaml"), seed=0).save(
        d / "cosegmentation_tiny.pth.tar")
    cfg = yaml.safe_load((ROOT / "configs" / "encoder" / "tiny.yaml").read_text())["model"]["encoder"]
    torch.manual_seed(0)
    enc = Encoder(w_dim=G.w_dim, num_ws=G.num_ws, img_resolution=G.img_resolution, **cfg)
    save_encoder(enc, d / "encoder.safetensors", d / "generator_tiny.safetensors")
    config = d / "infer.yaml"
    config.write_text(
        (ROOT / "configs" / "infer" / "tiny.yaml").read_text()
        .replace("outputs/tiny/generator_tiny.safetensors", str(d / "generator_tiny.safetensors"))
        .replace("outputs/encoder_tiny_demo/encoder.safetensors", str(d / "encoder.safetensors"))
        .replace("outputs/tiny/cosegmentation_tiny.pth.tar", str(d / "cosegmentation_tiny.pth.tar")))
    return config


def settings_for(config: Path, batch_size: int, device: str):
    from anonymizer.cli import build_parser, settings_from_args

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

    from anonymizer.photos import anonymize_images, list_images, load_models

    with tempfile.TemporaryDirectory(prefix="bench_photos_") as tmp:
        tmp = Path(tmp)
        config = build_tiny_models(tmp / "models")
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
