"""Anonymize a video: every chosen person's face is replaced by a virtual face in every frame.

    python infer.py --video IN --out OUT_DIR [--config configs/infer/default.yaml] [--candidate K] [--seed S]
        [--swap_parts 1,2,5] [--face all|largest|INDEX] [--fallback blur|mosaic|blackbox|none] [--strict]
        [--generator G] [--encoder E] [--cosegmentation C] [--cosegmentation_config Y]
    python infer.py --images PHOTO_OR_FOLDER --out OUT_DIR [the same options]

Writes OUT_DIR/anonymized.mp4, candidates.png, latent.npy and report.json (see anonymizer/pipeline.py); every option
of the config (``--detect.upsample``, ``--coverage.upsample``, ``--encode.crf``, ...) can be given on the command
line and overrides it. ``configs/infer/default.yaml`` is always read first; ``--config`` files and flags override it
in order. Exit status: 0 done, 1 error (nothing written), 2 ``--strict`` and a chosen face could not be covered or
the input ended early (the output is written and marked incomplete in report.json).

With ``--images`` (a photo, or a folder searched recursively for jpg/jpeg/png/webp/bmp) every photo is anonymized
into OUT_DIR, mirroring the input tree, plus report.json (see anonymizer/photos.py); a rerun into the same OUT_DIR
resumes. Exit status: 0 done, 1 a photo failed (the others are written) or an error before any work, 2 ``--strict``
and a chosen face was left uncovered.
"""
from __future__ import annotations

import sys
from pathlib import Path

from anonymizer.cli import build_parser, settings_from_args
from anonymizer.photos import anonymize_images
from anonymizer.photos import summary_line as photos_summary
from anonymizer.pipeline import anonymize_video, summary_line
from anonymizer.settings import InferSettings
from keepr.errors import KeeprError, cli_main


@cli_main
def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    cfg = parser.parse_args(argv)
    if (cfg.video is None) == (cfg.images is None):
        raise KeeprError("give exactly one of --video and --images")
    settings = settings_from_args(cfg)
    if cfg.images is not None:
        return images_main(cfg, settings, argv)
    command = ["infer.py", *(sys.argv[1:] if argv is None else argv)]
    report = anonymize_video(cfg.video, cfg.out, settings, command=command)
    print(summary_line(report, cfg.out))
    if settings.strict and not report["complete"]:
        print(f"error: --strict: {'; '.join(report['incomplete'])} (the output is written and marked incomplete in "
              f"{Path(cfg.out) / 'report.json'})", file=sys.stderr)
        raise SystemExit(2)
    return report


def images_main(cfg, settings: InferSettings, argv: list[str] | None) -> dict:
    """``--images``: anonymize photos (anonymizer.photos); one-line error and status 1 when a photo failed."""

    report = anonymize_images(cfg.images, cfg.out, settings,
                              command=["infer.py", *(sys.argv[1:] if argv is None else argv)])
    print(photos_summary(report, cfg.out))
    failed = report["failed"]
    if failed:
        raise KeeprError(f"{len(failed)} of {report['totals']['images']} photo(s) failed, e.g. {failed[0]['error']} "
                         f"(the others are written; {Path(cfg.out) / 'report.json'}: failed)")
    if settings.strict and not report["complete"]:
        print(f"error: --strict: {'; '.join(report['incomplete'])} (the photos are written; "
              f"{Path(cfg.out) / 'report.json'}: images[].coverage)", file=sys.stderr)
        raise SystemExit(2)
    return report


if __name__ == "__main__":
    main()
