"""The pipeline's command-line options, shared by every front end that takes them.

``infer.py``, ``python -m anonymizer.batch``, ``eval.run`` (its ``keepr`` method) and the web page parse the same
options into the same :class:`anonymizer.settings.InferSettings`: every field as ``--group.field`` (and as YAML keys
of ``configs/infer/*.yaml``, ``configs/infer/default.yaml`` always read first, then ``--config`` files and flags in
order).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from jsonargparse import ActionConfigFile, ArgumentParser

from anonymizer.settings import (
    BlendSettings,
    CoverageSettings,
    CropSettings,
    DetectSettings,
    EncodeSettings,
    InferSettings,
    ModelPaths,
    SwapSettings,
    TrackSettings,
    VirtualFaceSettings,
)
from keepr.errors import KeeprError

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "infer" / "default.yaml"


def build_parser() -> ArgumentParser:
    """infer.py's parser: input, output, model paths and every settings group."""
    p = ArgumentParser(prog="infer.py", description="Anonymize a video or photos: every chosen person's face is "
                       "replaced by a virtual face.", default_env=False, default_config_files=[str(DEFAULT_CONFIG)])
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
    """The parsed options as :class:`InferSettings`."""
    d = cfg.as_dict()
    groups = {k: d[k] for k in ("detect", "coverage", "track", "crop", "swap", "blend", "virtual_face", "encode")}
    groups["swap"]["parts"] = parse_parts(d["swap_parts"])
    groups["virtual_face"]["candidate"] = d["candidate"]
    return InferSettings.from_dict({
        "models": {k: d[k] for k in ("generator", "encoder", "cosegmentation", "cosegmentation_config")},
        "face": str(d["face"]), "fallback": d["fallback"], "strict": d["strict"], "seed": d["seed"],
        "progress": d["progress"], **groups,
    })
