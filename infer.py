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
from typing import Optional, Union

from jsonargparse import ActionConfigFile, ArgumentParser

from anonymizer.pipeline import anonymize_video, summary_line
from anonymizer.settings import (BlendSettings, CoverageSettings, CropSettings, DetectSettings, EncodeSettings,
                                 InferSettings, ModelPaths, SwapSettings, TrackSettings, VirtualFaceSettings)
from keepr.errors import KeeprError, cli_main

ROOT = Path(__file__).resolve().parent
DEFAULT_CONFIG = ROOT / "configs" / "infer" / "default.yaml"


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="infer.py", description=__doc__.split("\n\n")[0], default_env=False,
                       default_config_files=[str(DEFAULT_CONFIG)])
    p.add_argument("--config", action=ActionConfigFile, help="YAML config (configs/infer/*.yaml)")
    p.add_argument("--video", type=Optional[str], default=None,
                   help="input video (anything FFmpeg reads; GIF too); exactly one of --video and --images")
    p.add_argument("--images", type=Optional[str], default=None,
                   help="a photo or a folder of photos (jpg, jpeg, png, webp, bmp; searched recursively)")
    p.add_argument("--out", type=str, required=True,
                   help="output directory (must not exist or be empty; with --images: or an earlier --images run "
                        "into it, which is resumed)")
    p.add_argument("--generator", type=str, default=ModelPaths.generator,
                   help="StyleGAN2 generator (NVlabs .pkl, rosinality .pt or KEEP:R .safetensors)")
    p.add_argument("--encoder", type=str, default=ModelPaths.encoder, help="trained encoder (.safetensors)")
    p.add_argument("--cosegmentation", type=str, default=ModelPaths.cosegmentation,
                   help="co-part segmentation checkpoint (.pth.tar)")
    p.add_argument("--cosegmentation_config", type=str, default=ModelPaths.cosegmentation_config,
                   help="its YAML config (configs/cosegmentation/)")
    p.add_argument("--candidate", type=Optional[int], default=None,
                   help="virtual-face candidate index (default: the first that passes the identity guard)")
    p.add_argument("--seed", type=int, default=0, help="seed of the candidates' latent noise")
    p.add_argument("--swap_parts", type=Union[str, list[int]], default="1,2,5",
                   help="co-part segments swapped in from the virtual face, e.g. 1,2,5")
    p.add_argument("--face", type=str, default=InferSettings.face,
                   help="whose face: 'all' (every person, the default), 'largest' or a person index (persons "
                        "sorted by size x duration; the others are kept and listed in the report)")
    p.add_argument("--fallback", type=str, default=InferSettings.fallback,
                   help="blur|mosaic|blackbox|none: applied to faces of chosen persons the swap does not cover")
    p.add_argument("--strict", type=bool, default=False,
                   help="exit with status 2 when a chosen face is left uncovered or the input ends early")
    p.add_argument("--progress", type=bool, default=True, help="show a progress bar")
    p.add_class_arguments(DetectSettings, "detect")
    p.add_class_arguments(CoverageSettings, "coverage")
    p.add_class_arguments(TrackSettings, "track")
    p.add_class_arguments(CropSettings, "crop")
    p.add_class_arguments(SwapSettings, "swap", skip={"parts"})
    p.add_class_arguments(BlendSettings, "blend")
    p.add_class_arguments(VirtualFaceSettings, "virtual_face", skip={"candidate"})
    p.add_class_arguments(EncodeSettings, "encode")
    return p


def parse_parts(parts) -> list[int]:
    if isinstance(parts, str):
        try:
            return [int(v) for v in parts.replace(" ", "").split(",") if v]
        except ValueError:
            raise KeeprError(f"--swap_parts must be comma-separated integers, got {parts!r}") from None
    return [int(v) for v in parts]


def settings_from_args(cfg) -> InferSettings:
    d = cfg.as_dict()
    groups = {k: d[k] for k in ("detect", "coverage", "track", "crop", "swap", "blend", "virtual_face", "encode")}
    groups["swap"]["parts"] = parse_parts(d["swap_parts"])
    groups["virtual_face"]["candidate"] = d["candidate"]
    return InferSettings.from_dict({
        "models": {k: d[k] for k in ("generator", "encoder", "cosegmentation", "cosegmentation_config")},
        "face": str(d["face"]), "fallback": d["fallback"], "strict": d["strict"], "seed": d["seed"],
        "progress": d["progress"], **groups,
    })


@cli_main
def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    cfg = parser.parse_args(argv)
    if (cfg.video is None) == (cfg.images is None):
        raise KeeprError("give exactly one of --video and --images")
    settings = settings_from_args(cfg)
    if cfg.images is not None:
        return images_main(cfg, settings, argv)
    report = anonymize_video(cfg.video, cfg.out, settings, command=["infer.py", *(sys.argv[1:] if argv is None else argv)])
    print(summary_line(report, cfg.out))
    if settings.strict and not report["complete"]:
        print(f"error: --strict: {'; '.join(report['incomplete'])} (the output is written and marked incomplete in "
              f"{Path(cfg.out) / 'report.json'})", file=sys.stderr)
        raise SystemExit(2)
    return report


def images_main(cfg, settings: InferSettings, argv: list[str] | None) -> dict:
    """``--images``: anonymize photos (anonymizer.photos); one-line error and status 1 when a photo failed."""
    from anonymizer.photos import anonymize_images, summary_line as photos_summary

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
