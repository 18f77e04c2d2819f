"""The anonymization methods KEEP:R is compared with, all driven by the same face tracking.

``none`` (the original), ``blur`` (Gaussian), ``mosaic`` (pixelation, as broadcasters and video platforms use today),
``blackbox`` (the face region painted black) and ``keepr`` (the full pipeline). The pixel methods act on the tracked
face box grown by ``margin`` of its size on each side (dlib's box is tight around brows-to-chin; the margin covers
forehead, cheeks and chin as a human editor would). Their strength is tied to the face size so that small and large
faces are treated alike.

Every method maps (frames, boxes) to anonymized frames; ``keepr`` runs ``anonymizer.pipeline`` on the video file
(which tracks with the same ``anonymizer.tracking.FaceTracker``) and reads its output back.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import cv2
import numpy as np

from keepr.errors import KeeprError

Box = Sequence[float]

PIXEL_METHODS = ("none", "blur", "mosaic", "blackbox")
ALL_METHODS = PIXEL_METHODS + ("keepr",)


def expand_box(box: Box, width: int, height: int, margin: float = 0.2) -> tuple[int, int, int, int]:
    """Grow (x0, y0, x1, y1) by ``margin`` x its size on each side and clip it to the frame (ints, x1/y1 exclusive)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    mx, my = (x1 - x0) * margin, (y1 - y0) * margin
    xa, ya = max(0, int(np.floor(x0 - mx))), max(0, int(np.floor(y0 - my)))
    xb, yb = min(width, int(np.ceil(x1 + mx))), min(height, int(np.ceil(y1 + my)))
    return xa, ya, xb, yb


def box_side(box: Box) -> float:
    """The longer side of a face box: the scale that blur strength and mosaic cells follow."""
    return max(float(box[2]) - float(box[0]), float(box[3]) - float(box[1]))


def blur_region(frame: np.ndarray, box: Box, margin: float = 0.2, sigma_frac: float = 0.15) -> np.ndarray:
    """Gaussian blur of the face region; sigma is ``sigma_frac`` x the face box side (about 1/7 of the face)."""
    out = frame.copy()
    x0, y0, x1, y1 = expand_box(box, frame.shape[1], frame.shape[0], margin)
    if x1 <= x0 or y1 <= y0:
        return out
    side = box_side(box)
    sigma = max(1.0, sigma_frac * side)
    # Blur a padded window so the kernel sees real pixels, not the border rule, near the region's edges.
    pad = int(np.ceil(3 * sigma))
    h, w = frame.shape[:2]
    pa, pb = max(0, y0 - pad), min(h, y1 + pad)
    qa, qb = max(0, x0 - pad), min(w, x1 + pad)
    window = cv2.GaussianBlur(frame[pa:pb, qa:qb], (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)
    out[y0:y1, x0:x1] = window[y0 - pa : y1 - pa, x0 - qa : x1 - qa]
    return out


def mosaic_region(frame: np.ndarray, box: Box, margin: float = 0.2, blocks: int = 8) -> np.ndarray:
    """Pixelate the face region into ``blocks`` cells across the face box side (area-averaged, nearest upscaling)."""
    out = frame.copy()
    x0, y0, x1, y1 = expand_box(box, frame.shape[1], frame.shape[0], margin)
    if x1 <= x0 or y1 <= y0:
        return out
    side = box_side(box)
    cell = max(1.0, side / blocks)
    gw, gh = max(1, int(round((x1 - x0) / cell))), max(1, int(round((y1 - y0) / cell)))
    small = cv2.resize(frame[y0:y1, x0:x1], (gw, gh), interpolation=cv2.INTER_AREA)
    out[y0:y1, x0:x1] = cv2.resize(small, (x1 - x0, y1 - y0), interpolation=cv2.INTER_NEAREST)
    return out


def blackbox_region(frame: np.ndarray, box: Box, margin: float = 0.2) -> np.ndarray:
    """Paint the face region black."""
    out = frame.copy()
    x0, y0, x1, y1 = expand_box(box, frame.shape[1], frame.shape[0], margin)
    out[y0:y1, x0:x1] = 0
    return out


def identity_region(frame: np.ndarray, box: Box, margin: float = 0.2) -> np.ndarray:
    """The ``none`` method: the original frame, unchanged (a copy)."""
    return frame.copy()


_PIXEL_OPS: dict[str, Callable[..., np.ndarray]] = {
    "none": identity_region,
    "blur": blur_region,
    "mosaic": mosaic_region,
    "blackbox": blackbox_region,
}


@dataclass
class PixelMethod:
    """A per-frame method applied inside the tracked box; frames without a box pass through unchanged."""

    name: str
    margin: float = 0.2  # box growth on each side, as a fraction of the box size

    def __post_init__(self):
        if self.name not in _PIXEL_OPS:
            raise KeeprError(f"unknown pixel method {self.name!r}; choose from {', '.join(PIXEL_METHODS)}")

    def apply(self, frame: np.ndarray, box: Box | None) -> np.ndarray:
        if box is None:
            return frame.copy()
        return _PIXEL_OPS[self.name](frame, box, margin=self.margin)

    def __call__(self, frames: Iterable[np.ndarray], boxes: Iterable[Box | None]) -> Iterator[np.ndarray]:
        for frame, box in zip(frames, boxes):
            yield self.apply(frame, box)


def parse_methods(text: str | Sequence[str]) -> list[str]:
    """'keepr,blur' -> ['keepr', 'blur'], checked against the known methods."""
    names = [m.strip() for m in (text.split(",") if isinstance(text, str) else text) if m.strip()]
    bad = [m for m in names if m not in ALL_METHODS]
    if bad or not names:
        raise KeeprError(f"--methods: unknown method(s) {', '.join(bad) or '(none given)'}; choose from {', '.join(ALL_METHODS)}")
    return list(dict.fromkeys(names))


def keepr_settings(options: dict | None = None):
    """``anonymizer.pipeline.InferSettings`` exactly as ``infer.py`` builds them from the same options.

    ``options`` maps infer.py flags without dashes to values, e.g. ``{"config": "configs/infer/tiny.yaml",
    "seed": 0}``; configs/infer/default.yaml is read first, as for infer.py.
    """
    from infer import build_parser, settings_from_args

    argv = ["--video", "unused", "--out", "unused"]
    for key, value in (options or {}).items():
        if value is not None:
            argv += [f"--{key}", str(value)]
    return settings_from_args(build_parser().parse_args(argv))


def track_target(
    frames: Sequence[np.ndarray],
    settings=None,
    progress: bool = False,
    desc: str = "track",
) -> list[tuple[float, float, float, float] | None]:
    """The target face's smoothed box in every frame (None where it is lost), tracked as ``infer.py`` tracks it.

    ``settings`` is an ``InferSettings`` (default: the pipeline's defaults); its ``detect``, ``track`` and ``face``
    parts are used with ``anonymizer.tracking.FaceTracker``, so every method anonymizes the region KEEP:R replaces.
    """
    from anonymizer.faces import detect_faces
    from anonymizer.pipeline import InferSettings, parse_face
    from anonymizer.tracking import FaceTracker, select_tracks

    s = settings or InferSettings()
    d, t = s.detect, s.track
    tracker = FaceTracker(iou_threshold=t.iou_threshold, max_age=t.max_age, link_distance=t.link_distance,
                          min_detections=t.min_detections, keep_images=False)
    it = enumerate(frames)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, total=len(frames), desc=desc, leave=False, unit="frame")
    for i, frame in it:
        faces = detect_faces(frame, d.detector, d.upsample, d.min_size, d.max_side) if i % d.every == 0 else None
        tracker.update(i, faces)
    which = parse_face(s.face)
    if which == "all":
        raise KeeprError("evaluation follows one face per video: use face 'largest' or a track index")
    track = select_tracks(tracker.finish(), which, source="video")[0]
    return [None if tb.box is None else tuple(float(v) for v in tb.box)
            for tb in track.timeline(len(frames), t.max_gap, t.hold, t.smooth_radius)]


def keepr_frames(video: str | Path, out_dir: str | Path, num_frames: int | None, settings) -> list[np.ndarray]:
    """Run the KEEP:R pipeline (``anonymizer.pipeline.anonymize_video``) and read back its first ``num_frames``."""
    from anonymizer.pipeline import anonymize_video
    from anonymizer.video import VideoReader

    anonymize_video(video, out_dir, settings)
    frames = []
    for f in VideoReader(Path(out_dir) / "anonymized.mp4"):
        if num_frames is not None and len(frames) >= num_frames:
            break
        frames.append(f.image)
    return frames
