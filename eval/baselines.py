"""The anonymization methods KEEP:R is compared with, all driven by the same face tracking.

``none`` (the original), ``blur`` (Gaussian), ``mosaic`` (pixelation, as broadcasters and video platforms use today),
``blackbox`` (the face region painted black) and ``keepr`` (the full pipeline). The pixel methods act on the tracked
face box grown by ``margin`` of its size on each side (dlib's box is tight around brows-to-chin; the margin covers
forehead, cheeks and chin as a human editor would). Their strength is tied to the face size so that small and large
faces are treated alike.

Every method maps (frames, boxes) to anonymized frames, one frame at a time; the boxes come from the pipeline's own
pass 1 (:func:`track_target`, ``anonymizer.scan.track_faces``); ``keepr`` runs ``anonymizer.pipeline`` on the video
file with ``--face largest`` (the same pass 1, the same person) and its output is read back frame by frame.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from anonymizer.cli import build_parser, settings_from_args
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
        raise KeeprError(f"--methods: unknown method(s) {', '.join(bad) or '(none given)'}; "
                         f"choose from {', '.join(ALL_METHODS)}")
    return list(dict.fromkeys(names))


def keepr_settings(options: dict | None = None):
    """``anonymizer.pipeline.InferSettings`` exactly as ``infer.py`` builds them from the same options, except that
    ``face`` defaults to ``largest``: every method of the evaluation anonymizes the same (largest) person.

    ``options`` maps infer.py flags without dashes to values, e.g. ``{"config": "configs/infer/tiny.yaml",
    "seed": 0}``; configs/infer/default.yaml is read first, as for infer.py.
    """

    argv = ["--video", "unused", "--out", "unused", "--face", "largest"]  # the evaluation follows one face a video
    for key, value in (options or {}).items():
        if value is not None:
            argv += [f"--{key}", str(value)]
    return settings_from_args(build_parser().parse_args(argv))


def track_target(
    video: str | Path,
    settings=None,
    recognizer=None,
    max_frames: int | None = None,
    progress: bool = False,
) -> list[tuple[float, float, float, float] | None]:
    """The evaluated face's smoothed box in every frame (None where it is lost): the pipeline's own pass 1.

    ``anonymizer.scan.track_faces`` runs over the WHOLE video exactly as ``infer.py`` runs it (``settings``: an
    ``InferSettings``, default the pipeline's defaults; ``recognizer``: the dlib ``FaceRecognizer`` that links tracks
    into persons, as ``anonymizer.pipeline.load_models`` makes it); the target is the most prominent person
    (``scan.persons[0]``, what ``--face largest`` swaps) and its boxes are ``Person.timeline`` with the track
    settings, the boxes the pipeline renders. Only then are the first ``max_frames`` kept, so every method of the
    evaluation, ``keepr`` included, works on the same boxes whatever ``--max_frames`` is. Memory: the frames are
    streamed (one image per track is kept). Raises KeeprError when no person is found.
    """
    from anonymizer.identity import FaceRecognizer  # heavy (torch): only in track_target()
    from anonymizer.pipeline import InferSettings, tqdm_progress  # heavy (torch): only in track_target()
    from anonymizer.scan import track_faces  # heavy (av): only in track_target()

    s = settings or InferSettings()
    scan = track_faces(video, s, recognizer if recognizer is not None else FaceRecognizer(),
                       progress=tqdm_progress(True) if progress else None)
    if not scan.persons:  # the evaluation's own message (results.csv, its tests): the pipeline's is scan-specific
        raise KeeprError(f"{video}: no face found in any frame")
    t = s.track
    timeline = scan.persons[0].timeline(scan.num_frames, t.max_gap, t.hold, t.smooth_radius)
    boxes = [None if tb.box is None else tuple(float(v) for v in tb.box) for tb in timeline]
    return boxes if max_frames is None else boxes[:max_frames]


def keepr_frames(video: str | Path, out_dir: str | Path, settings) -> Iterator[np.ndarray]:
    """Run the KEEP:R pipeline (``anonymizer.pipeline.anonymize_video``, whole video) into ``out_dir``, then yield its
    output frames one by one (streamed: the caller stops when it has enough)."""
    from anonymizer.pipeline import anonymize_video  # heavy (torch): only in keepr_frames()
    from anonymizer.video import VideoReader  # heavy (av): only in keepr_frames()

    anonymize_video(video, out_dir, settings)
    for f in VideoReader(Path(out_dir) / "anonymized.mp4"):
        yield f.image
