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
from typing import Iterable, Iterator, Sequence

import numpy as np

from anonymizer.fallback import REGION_OPS as _PIXEL_OPS
from keepr.errors import KeeprError

Box = Sequence[float]

PIXEL_METHODS = ("none", "blur", "mosaic", "blackbox")
ALL_METHODS = PIXEL_METHODS + ("keepr",)


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
    """``anonymizer.pipeline.InferSettings`` exactly as ``infer.py`` builds them from the same options, except that
    ``face`` defaults to ``largest``: every method of the evaluation anonymizes the same (largest) person.

    ``options`` maps infer.py flags without dashes to values, e.g. ``{"config": "configs/infer/tiny.yaml",
    "seed": 0}``; configs/infer/default.yaml is read first, as for infer.py.
    """
    from anonymizer.cli import build_parser, settings_from_args

    argv = ["--video", "unused", "--out", "unused", "--face", "largest"]  # the evaluation follows one face a video
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
        which = "largest"  # the evaluation follows one face a video: the largest
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
