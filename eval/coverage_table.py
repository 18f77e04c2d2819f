"""Coverage of ``infer.py`` on the bundled clips: the README's table.

    python -m eval.coverage_table [--config configs/infer/tiny.yaml] [--out results/coverage] [--clips FILE ...]

Runs the pipeline (``anonymizer.pipeline.anonymize_video``) on each clip with ``--face all`` and the default
fallback, and prints one Markdown row per clip from its ``report.json``: persons, face-frames the coverage detector
found, how each was anonymized (swap / fallback), how many were left, and the identity check. Without ``--config``
the demo's tiny architectures are built (random weights, ``models.tiny``) into a temporary directory, as the tests
do: the figures are about *which faces get covered*, not about the look of the virtual face.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from anonymizer.pipeline import anonymize_video
from anonymizer.settings import InferSettings
from models.tiny import make_tiny_models

ROOT = Path(__file__).resolve().parents[1]
VIDEOS = ROOT / "tests" / "fixtures" / "media" / "videos"
# Clips and the detector settings they need (the small faces of the Intel previews need upsampling); hand-labelled
# face-frames where every frame was checked by eye.
CLIPS = [
    ("data/samples/lrwp9a.mpg", {}, 75),
    ("tests/fixtures/media/videos/bbaf2n.mpg", {}, 75),
    ("tests/fixtures/media/videos/face-demographics-first12.mp4", {"detect": {"upsample": 1}}, 36),
    ("tests/fixtures/media/videos/head-pose-face-detection-female.gif", {"detect": {"upsample": 1}}, None),
    ("tests/fixtures/media/videos/asl_thanks.mkv", {"detect": {"upsample": 1}}, None),
    ("tests/fixtures/media/videos/video_01.mp4", {"detect": {"upsample": 1, "every": 1}}, None),
]


def row(name: str, rep: dict, labelled: int | None) -> str:
    c = rep["coverage"]
    ident = f"{c['identity_matches']}/{c['identity_checked']}" if c["identity_check"] else "off"
    return (f"| {name} | {rep['totals']['frames']} | {rep['persons']['found']} | "
            f"{labelled if labelled is not None else '–'} | {c['face_frames']} | {c['by_swap']} | "
            f"{c['by_fallback']} | {c['left']} | {ident} | {'yes' if rep['complete'] else 'no'} |")


HEADER = ("| clip | frames | persons | faces (hand count) | faces found | swap | fallback | left | "
          "identity still matches | complete |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="results/coverage")
    p.add_argument("--identity_every", type=int, default=5, help="identity check on every k-th frame")
    a = p.parse_args(argv)
    out = Path(a.out)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_tiny_models(Path(tmp) / "models")
        models = {k: paths[k] for k in ("generator", "encoder", "cosegmentation", "cosegmentation_config")}
        for clip, extra, labelled in CLIPS:
            d = {"models": models, "progress": False, "coverage": {"identity_every": a.identity_every},
                 "encode": {"preset": "veryfast"}, "detect": {"upsample": 0, "every": 2}}
            for k, v in extra.items():
                d[k] = {**d.get(k, {}), **v}
            dest = out / Path(clip).stem
            if (dest / "report.json").is_file():
                rep = json.loads((dest / "report.json").read_text())
            else:
                rep = anonymize_video(ROOT / clip, dest, InferSettings.from_dict(d))
            rows.append(row(Path(clip).name, rep, labelled))
            print(rows[-1], flush=True)
    print("\n" + HEADER + "\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
