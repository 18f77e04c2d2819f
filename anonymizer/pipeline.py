"""The offline anonymization pipeline: a video in, the same video with the target face(s) replaced out.

Two streaming passes over the input, so memory does not grow with the video's length:

1. Track: decode each frame, detect faces (every ``detect.every`` frames), associate them into tracks
   (:mod:`anonymizer.tracking`), keep each track's best frame (one image per track). Frame timestamps are recorded
   to plan the output's (:func:`anonymizer.video.plan_timestamps`).
2. Swap: build one virtual face per selected track from its best frame (:mod:`anonymizer.virtual_face`), crop it
   with the co-part framing (:mod:`anonymizer.crop`), then decode the video again and, ``batch_size`` frames at a
   time, crop the tracked face, part-swap (``models.cosegmentation.PartSwapper``), paste back with a feathered mask
   (:mod:`anonymizer.blend`) and encode (:mod:`anonymizer.video`). Frames where a track is ``lost`` are passed
   through unchanged and listed in the report.

Everything is written into a temporary directory next to ``out_dir`` and renamed into place when complete
(``keepr.fileio.atomic_dir``): on any failure nothing appears at ``out_dir``.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from keepr.errors import KeeprError, MissingWeightsError
from keepr.fileio import atomic_dir, sha256_file

from anonymizer.blend import feather_mask, paste
from anonymizer.crop import crop_aligned, crop_box, crop_frame
from anonymizer.tracking import FaceTracker, select_tracks
from anonymizer.video import VideoReader, VideoWriter, plan_timestamps

# Where each official file comes from (for MissingWeightsError).
WEIGHT_SOURCES = {
    "generator": ("StyleGAN2 generator", "NVlabs stylegan2-ada-pytorch "
                  "(https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/ffhq.pkl) or a rosinality "
                  "stylegan2-pytorch .pt; for tests: python scripts/make_tiny_models.py"),
    "encoder": ("trained encoder", "train it: python train_encoder.py fit --config configs/encoder/ffhq256.yaml "
                "(see README); for tests: configs/encoder/tiny.yaml"),
    "cosegmentation": ("co-part segmentation checkpoint", "the motion-cosegmentation release "
                       "(github.com/AliaksandrSiarohin/motion-cosegmentation, vox-10segments.pth.tar); for tests: "
                       "python scripts/make_tiny_models.py"),
    "cosegmentation_config": ("co-part segmentation config", "configs/cosegmentation/ in this repository"),
}


# ------------------------------------------------------------------------------------------------------------------
# Settings (one dataclass per group; infer.py exposes every field as --group.field and YAML keys).


@dataclass
class DetectSettings:
    detector: str = "hog"  # dlib detector: 'hog' (fast, frontal) or 'cnn' (slower, more poses)
    upsample: int = 1  # 2x upsamplings before detection (1 finds faces down to ~40 px)
    every: int = 1  # run the detector every k frames; frames between are interpolated
    max_side: int | None = None  # detect on a copy downscaled to this longer side (None = full size)
    min_size: int = 0  # drop detections with a smaller box side (px)


@dataclass
class TrackSettings:
    iou_threshold: float = 0.3  # least box overlap to continue a track
    max_age: int = 25  # frames a track may go undetected and still be continued
    link_distance: float = 1.0  # re-link a track found again within this many box sizes of where it was lost
    min_detections: int = 2  # shorter tracks are dropped as false positives
    max_gap: int = 10  # undetected runs up to this long between detections are interpolated
    hold: int = 5  # beyond that, keep the last box this many frames, then pass frames through (lost)
    smooth_radius: int = 2  # centred moving average over 2 * radius + 1 frames


@dataclass
class CropSettings:
    scale: float = 1.8  # crop side / face box side (co-part models see the whole head)
    shift_y: float = -0.1  # crop centre offset in face box heights (negative = up)


@dataclass
class SwapSettings:
    parts: list[int] = field(default_factory=lambda: [1, 2, 5])  # co-part segments taken from the virtual face
    hard: bool = False  # binarise the part mask inside the model
    mask_from: str = "driving"  # segment the parts on the 'driving' frame or the 'source' virtual face
    batch_size: int = 8  # frames per part-swap batch (memory is bounded by this)
    device: str = "cpu"  # torch device for the models


@dataclass
class BlendSettings:
    mask: str = "parts"  # 'parts' (the swapped parts' mask) or 'crop' (the whole crop)
    dilate: float = 6.0  # grow the part mask (px at 256)
    blur: float = 6.0  # Gaussian feather (px at 256)
    border: float = 0.06  # fade to 0 over this fraction of the crop side at its edge


@dataclass
class VirtualFaceSettings:
    num_candidates: int = 9  # candidates made and shown in candidates.png
    candidate: int | None = None  # chosen index (None = first that passes the identity guard)
    noise: float = 1.0  # latent noise, in units of W's per-dimension spread
    layers: list[str] = field(default_factory=lambda: ["coarse", "middle"])  # style layers that get the noise
    guard_threshold: float | None = 0.6  # least dlib distance to the target (None = guard off)
    max_redraws: int = 5  # redraws of a candidate that is too close to the target
    skin_match: bool = True  # match the chosen face's skin tone to the target's


@dataclass
class EncodeSettings:
    crf: int = 18  # x264 quality
    preset: str = "medium"  # x264 speed
    audio: str = "copy"  # 'copy' (unchanged), 'aac' (re-encode) or 'none'


@dataclass
class ModelPaths:
    generator: str = "weights/ffhq.pkl"
    encoder: str = "weights/encoder_ffhq256.safetensors"
    cosegmentation: str = "weights/vox-10segments.pth.tar"
    cosegmentation_config: str = "configs/cosegmentation/vox-256-10segments.yaml"


@dataclass
class InferSettings:
    models: ModelPaths = field(default_factory=ModelPaths)
    face: str = "largest"  # 'largest', 'all' or a track index (tracks sorted by size x duration)
    seed: int = 0
    detect: DetectSettings = field(default_factory=DetectSettings)
    track: TrackSettings = field(default_factory=TrackSettings)
    crop: CropSettings = field(default_factory=CropSettings)
    swap: SwapSettings = field(default_factory=SwapSettings)
    blend: BlendSettings = field(default_factory=BlendSettings)
    virtual_face: VirtualFaceSettings = field(default_factory=VirtualFaceSettings)
    encode: EncodeSettings = field(default_factory=EncodeSettings)
    progress: bool = True  # progress bar on stderr

    @classmethod
    def from_dict(cls, d: dict) -> "InferSettings":
        groups = {"models": ModelPaths, "detect": DetectSettings, "track": TrackSettings, "crop": CropSettings,
                  "swap": SwapSettings, "blend": BlendSettings, "virtual_face": VirtualFaceSettings,
                  "encode": EncodeSettings}
        kw = {}
        for k, v in d.items():
            if k in groups:
                kw[k] = groups[k](**(v or {}))
            elif k in cls.__dataclass_fields__:
                kw[k] = v
            else:
                raise KeeprError(f"unknown setting {k!r}")
        return cls(**kw)


def parse_face(which) -> str | int:
    if isinstance(which, int) or (isinstance(which, str) and which.lstrip("-").isdigit()):
        return int(which)
    if which in ("largest", "all"):
        return which
    raise KeeprError(f"--face must be 'largest', 'all' or a track index, got {which!r}")


# ------------------------------------------------------------------------------------------------------------------
# Checks before any work.


def check_settings(s: InferSettings) -> None:
    """Fail fast, before reading the video or the models, on settings that cannot work."""
    n = s.virtual_face.num_candidates
    c = s.virtual_face.candidate
    if n < 1:
        raise KeeprError(f"num_candidates must be >= 1, got {n}")
    if c is not None and not 0 <= c < n:
        raise KeeprError(f"--candidate {c} out of range: there are {n} candidates (0..{n - 1})")
    parse_face(s.face)
    if s.detect.every < 1:
        raise KeeprError(f"detect.every must be >= 1, got {s.detect.every}")
    if s.track.max_gap < s.detect.every - 1:
        raise KeeprError(f"track.max_gap ({s.track.max_gap}) must be >= detect.every - 1 ({s.detect.every - 1}) so "
                         "that frames between detections are interpolated")
    if s.blend.mask not in ("parts", "crop"):
        raise KeeprError(f"blend.mask must be 'parts' or 'crop', got {s.blend.mask!r}")
    if not s.swap.parts:
        raise KeeprError("swap.parts is empty: name the co-part segments to swap, e.g. 1,2,5")


def check_model_files(paths: ModelPaths) -> dict:
    """Every model file must exist: MissingWeightsError naming the first missing one and where to get it."""
    out = {}
    for key, (what, where) in WEIGHT_SOURCES.items():
        p = getattr(paths, key)
        if not p or not Path(p).is_file():
            raise MissingWeightsError(str(p), what, where)
        out[key] = {"path": str(p), "sha256": sha256_file(p)}
    return out


def check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise KeeprError(f"{out_dir}: output exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise KeeprError(f"{out_dir}: output directory exists and is not empty; choose another --out or remove it")
    parent = out_dir.resolve().parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise KeeprError(f"{out_dir}: cannot create the output directory ({probe} is not a directory)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise KeeprError(f"{out_dir}: cannot create the output directory ({probe} is not writable)")


# ------------------------------------------------------------------------------------------------------------------
# Pieces.


class Stopwatch:
    """Accumulates seconds per stage (for the report and bench/infer.py)."""

    def __init__(self):
        self.total: dict[str, float] = {}
        self.count: dict[str, int] = {}

    def add(self, stage: str, seconds: float, n: int = 1) -> None:
        self.total[stage] = self.total.get(stage, 0.0) + seconds
        self.count[stage] = self.count.get(stage, 0) + n

    def summary(self) -> dict:
        return {k: {"seconds": round(v, 4), "items": self.count[k],
                    "per_second": round(self.count[k] / v, 2) if v > 0 else None} for k, v in self.total.items()}


def _progress(total, desc, enabled):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="frame", disable=not enabled, file=sys.stderr, dynamic_ncols=True,
                leave=True)


@dataclass
class Models:
    G: object
    encoder: object
    coseg: object
    recognizer: object


def load_models(paths: ModelPaths, device: str = "cpu") -> Models:
    from anonymizer.identity import FaceRecognizer
    from models.cosegmentation import load_cosegmentation
    from models.encoder import load_encoder
    from models.stylegan2 import load_generator

    G = load_generator(paths.generator, device=device)
    enc = load_encoder(paths.encoder, paths.generator, device=device)
    coseg = load_cosegmentation(paths.cosegmentation, paths.cosegmentation_config, device=device)
    return Models(G=G, encoder=enc, coseg=coseg, recognizer=FaceRecognizer())


def track_pass(reader: VideoReader, s: InferSettings, watch: Stopwatch, frames_report: list) -> tuple[list, list]:
    """Pass 1: detection and tracking. Returns (tracks sorted by prominence, per-frame (time, pts))."""
    from anonymizer.faces import detect_faces

    tracker = FaceTracker(iou_threshold=s.track.iou_threshold, max_age=s.track.max_age,
                          link_distance=s.track.link_distance, min_detections=s.track.min_detections)
    stamps = []
    bar = _progress(reader.estimated_frames(), "track", s.progress)
    t_dec = time.perf_counter()
    for f in reader:
        now = time.perf_counter()
        watch.add("decode", now - t_dec)
        stamps.append((f.time, f.pts))
        rec = {"index": f.index, "time": None if f.time is None else round(f.time, 5), "detected": None,
               "timing_ms": {"decode": round((now - t_dec) * 1e3, 2)}}
        faces = None
        if f.index % s.detect.every == 0:
            t0 = time.perf_counter()
            faces = detect_faces(f.image, s.detect.detector, s.detect.upsample, s.detect.min_size, s.detect.max_side)
            dt = time.perf_counter() - t0
            watch.add("detect", dt)
            rec["detected"] = len(faces)
            rec["timing_ms"]["detect"] = round(dt * 1e3, 2)
        t0 = time.perf_counter()
        tracker.update(f.index, faces, image=f.image)
        watch.add("track", time.perf_counter() - t0)
        frames_report.append(rec)
        bar.update(1)
        t_dec = time.perf_counter()
    bar.close()
    t0 = time.perf_counter()
    tracks = tracker.finish()
    watch.add("track", time.perf_counter() - t0, 0)
    return tracks, stamps


@dataclass
class Target:
    """One anonymized track: its timeline, virtual face and part swapper."""

    track: object
    timeline: list
    virtual: object
    source_crop: np.ndarray
    swapper: object


def _to_tensor(images: list[np.ndarray], device):
    import torch

    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255.0)
    return x.to(device)


def _to_uint8(x) -> np.ndarray:
    return (x.clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).cpu().numpy())


def swap_pass(reader: VideoReader, writer: VideoWriter, targets: list[Target], pts_out: list[int],
              s: InferSettings, img_size: int, watch: Stopwatch, frames_report: list) -> None:
    """Pass 2: crop, part swap, paste back and encode, ``batch_size`` frames at a time."""
    import torch

    bs = max(1, s.swap.batch_size)
    masks_needed = s.blend.mask == "parts"
    crop_only_mask = feather_mask(None, img_size, border=s.blend.border)
    bar = _progress(len(pts_out), "anonymize", s.progress)
    batch: list = []

    def flush():
        if not batch:
            return
        frames = [b[0] for b in batch]
        outs = [fr.copy() for fr in frames]
        for ti, tgt in enumerate(targets):
            items = [(k, b[1][ti]) for k, b in enumerate(batch) if b[1][ti] is not None]
            if not items:
                continue
            t0 = time.perf_counter()
            x = _to_tensor([c for _, (c, _) in items], s.swap.device)
            with torch.no_grad():
                if masks_needed:
                    y, m = tgt.swapper(x, return_mask=True)
                    m = m[:, 0].cpu().numpy()
                else:
                    y, m = tgt.swapper(x), None
            swapped = _to_uint8(y)
            dt = time.perf_counter() - t0
            watch.add("swap", dt, len(items))
            for j, (k, (_, inv)) in enumerate(items):
                t1 = time.perf_counter()
                mask = feather_mask(m[j], img_size, s.blend.dilate, s.blend.blur, s.blend.border) if m is not None \
                    else crop_only_mask
                paste(outs[k], swapped[j], inv, mask, out=outs[k])
                dp = time.perf_counter() - t1
                watch.add("paste", dp)
                tm = frames_report[batch[k][2]]["timing_ms"]
                tm["swap"] = round(tm.get("swap", 0.0) + dt / len(items) * 1e3, 2)
                tm["paste"] = round(tm.get("paste", 0.0) + dp * 1e3, 2)
        for k, out in enumerate(outs):
            idx = batch[k][2]
            t0 = time.perf_counter()
            writer.write(out, pts_out[idx])
            de = time.perf_counter() - t0
            watch.add("encode", de)
            frames_report[idx]["timing_ms"]["encode"] = round(de * 1e3, 2)
        bar.update(len(batch))
        batch.clear()

    t_dec = time.perf_counter()
    for f in reader:
        watch.add("decode", time.perf_counter() - t_dec)
        if f.index >= len(pts_out):
            raise KeeprError(f"{reader.path}: decoded more frames on the second pass than on the first")
        crops = []
        t0 = time.perf_counter()
        for tgt in targets:
            tb = tgt.timeline[f.index]
            if tb.box is None:
                crops.append(None)
                continue
            cb = crop_box(tb.box, s.crop.scale, s.crop.shift_y)
            crop, inv = crop_frame(f.image, cb, img_size)
            crops.append((crop, inv))
        dc = time.perf_counter() - t0
        if any(c is not None for c in crops):
            watch.add("crop", dc, sum(c is not None for c in crops))
            frames_report[f.index]["timing_ms"]["crop"] = round(dc * 1e3, 2)
        batch.append((f.image, crops, f.index))
        if len(batch) >= bs:
            flush()
        t_dec = time.perf_counter()
    flush()
    bar.close()
    if writer.frames_written != len(pts_out):
        raise KeeprError(f"{reader.path}: the second pass decoded {writer.frames_written} frames, the first "
                         f"{len(pts_out)}; the file may be damaged")


# ------------------------------------------------------------------------------------------------------------------
# Entry point.


def anonymize_video(video: str | os.PathLike, out_dir: str | os.PathLike, settings: InferSettings,
                    command: list[str] | None = None, load: Callable[[ModelPaths, str], Models] = load_models) -> dict:
    """Anonymize ``video`` into ``out_dir`` (anonymized.mp4, candidates*.png, latent*.npy, report.json).

    Returns the report. Raises KeeprError (nothing written at ``out_dir``) on bad input, missing weights, no face...
    """
    import torch

    from anonymizer.virtual_face import build_virtual_face, save_virtual_face

    t_start = time.perf_counter()
    s = settings
    check_settings(s)
    video = Path(video)
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    reader = VideoReader(video)  # validates the input (missing, empty, corrupt, image, text...)
    model_files = check_model_files(s.models)
    which = parse_face(s.face)
    watch = Stopwatch()

    t0 = time.perf_counter()
    models = load(s.models, s.swap.device)
    watch.add("load_models", time.perf_counter() - t0, 0)
    img_size = int(models.coseg.img_size)
    for p in s.swap.parts:
        if not 1 <= int(p) <= models.coseg.num_segments:
            raise KeeprError(f"swap part {p} out of range: the co-part model has segments 1..{models.coseg.num_segments}"
                             " (0 is the background)")

    frames_report: list[dict] = []
    tracks, stamps = track_pass(reader, s, watch, frames_report)
    num_frames = len(stamps)
    if not tracks:
        hint = (f"; faces smaller than about {80 >> s.detect.upsample} px need a larger --detect.upsample (now "
                f"{s.detect.upsample})" if s.detect.upsample < 2 else "")
        raise KeeprError(f"{video}: no face found in any frame (detector {s.detect.detector}{hint})")
    selected = select_tracks(tracks, which, source=str(video))
    tb_out, pts_out = plan_timestamps([t for t, _ in stamps], reader.fps, reader.time_base, [p for _, p in stamps],
                                      reader.start_time)

    try:
        with atomic_dir(out_dir) as tmp:
            targets, tracks_report = [], []
            for k, tr in enumerate(selected):
                t0 = time.perf_counter()
                # The best frame is kept only around the face: work in that sub-image's coordinates.
                ox, oy = tr.best_offset
                vf = build_virtual_face(models, tr.best_image, tr.best_landmarks - np.array([ox, oy]),
                                        s.virtual_face, seed=s.seed + tr.id)
                watch.add("virtual_face", time.perf_counter() - t0)
                suffix = "" if len(selected) == 1 else f"_{tr.id}"
                files = save_virtual_face(vf, tmp, suffix)
                bx = tr.best_box
                src_box = crop_box((bx[0] - ox, bx[1] - oy, bx[2] - ox, bx[3] - oy), s.crop.scale, s.crop.shift_y)
                source_crop = crop_aligned(vf.image, vf.align_matrix, vf.align_size, src_box, img_size)
                from models.cosegmentation import PartSwapper

                swapper = PartSwapper(models.coseg, _to_tensor([source_crop], s.swap.device), s.swap.parts,
                                      hard=s.swap.hard, mask_from=s.swap.mask_from, batch_size=s.swap.batch_size)
                timeline = tr.timeline(num_frames, s.track.max_gap, s.track.hold, s.track.smooth_radius)
                targets.append(Target(tr, timeline, vf, source_crop, swapper))
                tr.best_image = None  # no longer needed
                tracks_report.append({
                    "track": tr.id, "first_frame": tr.first_index, "last_frame": tr.last_index,
                    "detected_frames": len(tr.detections), "best_frame": tr.best_index,
                    "best_box": [round(v, 2) for v in tr.best_box],
                    "virtual_face": {**vf.report, "files": files},
                })

            for rec in frames_report:
                rec["faces"] = []
            for tgt in targets:
                for tbx in tgt.timeline:
                    entry = {"track": tgt.track.id, **tbx.as_dict()}
                    if tbx.box is not None:
                        entry["crop"] = crop_box(tbx.box, s.crop.scale, s.crop.shift_y).as_list()
                    frames_report[tbx.index]["faces"].append(entry)

            out_video = tmp / "anonymized.mp4"
            writer = VideoWriter(out_video, reader.width, reader.height, reader.fps, audio_from=video,
                                 time_base=tb_out, start_time=reader.start_time, crf=s.encode.crf,
                                 preset=s.encode.preset, audio=s.encode.audio)
            try:
                swap_pass(reader, writer, targets, pts_out, s, img_size, watch, frames_report)
            except BaseException:
                writer._abort()
                raise
            writer.close()

            # A frame is passed through when no target face was pasted into it; a face is "lost" when its track
            # has no box inside the span where it was seen (before its first / after its last detection the face
            # is simply not in the video).
            passed = [r["index"] for r in frames_report if all(e["status"] == "lost" for e in r["faces"])]
            lost = sorted({tbx.index for tgt in targets for tbx in tgt.timeline if tbx.status == "lost"
                           and tgt.track.first_index <= tbx.index <= tgt.track.last_index})
            status_counts = {}
            for r in frames_report:
                for e in r["faces"]:
                    status_counts[e["status"]] = status_counts.get(e["status"], 0) + 1
            elapsed = time.perf_counter() - t_start
            report = {
                "keepr": {"report_version": 1, "python": platform.python_version(), "torch": torch.__version__},
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "command": command,
                "input": {"path": str(video), "sha256": sha256_file(video), "video": reader.info.as_dict()},
                "models": {**model_files, "cosegmentation_img_size": img_size,
                           "cosegmentation_num_segments": int(models.coseg.num_segments)},
                "settings": asdict(s),
                "output": {"dir": str(out_dir), "video": "anonymized.mp4", "sha256": sha256_file(out_video),
                           "width": reader.width, "height": reader.height,
                           "fps": f"{reader.fps.numerator}/{reader.fps.denominator}",
                           "time_base": f"{tb_out.numerator}/{tb_out.denominator}",
                           "num_frames": writer.frames_written, "audio": writer.audio_summary()},
                "tracks": {"found": len(tracks), "selected": [t.id for t in selected],
                           "all": [{"track": t.id, "first_frame": t.first_index, "last_frame": t.last_index,
                                    "detected_frames": len(t.detections)} for t in tracks],
                           "anonymized": tracks_report},
                "frames": frames_report,
                "totals": {
                    "frames": num_frames,
                    "frames_anonymized": num_frames - len(passed),
                    "frames_passed_through": passed,
                    "frames_face_lost": lost,
                    "face_status_counts": status_counts,
                    "seconds": round(elapsed, 3),
                    "fps": round(num_frames / elapsed, 3) if elapsed > 0 else None,
                    "stages": watch.summary(),
                },
            }
            (tmp / "report.json").write_text(json.dumps(report, indent=1))
    except PermissionError as exc:
        raise KeeprError(f"{out_dir}: cannot write output ({exc.strerror})") from None
    except (NotADirectoryError, FileExistsError, IsADirectoryError) as exc:
        raise KeeprError(f"{out_dir}: cannot write output ({exc.strerror}: {exc.filename})") from None
    if lost:
        print(f"warning: face lost in {len(lost)} frame(s), passed through unchanged there (report.json: "
              f"totals.frames_face_lost)", file=sys.stderr)
    return report
