"""The "faces left" metric: faces in the original frames that a method left as they were.

The same coverage detector as ``infer.py`` (:meth:`anonymizer.settings.InferSettings.coverage_detector`, at least
as sensitive as its tracking) finds every face in every original frame, anyone's. A face is *left* by a method when
the method's output changed its inner box (the middle 60 %: eyes, nose, mouth) by less than ``MIN_CHANGE`` grey
levels on average: above codec noise (a re-encoded frame differs by 1-2 levels), far below what a swap, blur,
mosaic or black box does. Evaluation follows one person per video, so a method that anonymizes only that person
leaves the others, and this counts them: a method that leaves faces visible cannot hide behind its other scores.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from anonymizer.coverage import inner_points, ranges

MIN_CHANGE = 6.0  # mean absolute change (grey levels) over a face's inner box that counts as anonymized


def faces_in_frame(image: np.ndarray, settings) -> list[tuple]:
    """The (x0, y0, x1, y1) of every face the coverage detector of ``settings`` finds in one frame."""
    from anonymizer.faces import detect_faces  # heavy (torch): only in faces_in_frame()

    detector, upsample = settings.coverage_detector()
    faces = detect_faces(image, detector, upsample, 0, settings.detect.max_side)
    return [tuple(float(v) for v in f.box) for f in faces]


def faces_in_frames(frames: Iterable[np.ndarray], settings) -> list[list[tuple]]:
    """Per frame, the (x0, y0, x1, y1) of every face the coverage detector of ``settings`` finds."""
    return [faces_in_frame(img, settings) for img in frames]


def inner_change(original: np.ndarray, anonymized: np.ndarray, box: Sequence[float]) -> float:
    """Mean absolute difference (grey levels, RGB averaged) over the inner box of ``box``."""
    pts = inner_points(box, n=1)[0]
    x0, y0, x1, y1 = box
    hw, hh = (x1 - x0) * 0.3, (y1 - y0) * 0.3
    h, w = original.shape[:2]
    a, b = max(0, int(pts[0] - hw)), min(w, int(np.ceil(pts[0] + hw)))
    c, d = max(0, int(pts[1] - hh)), min(h, int(np.ceil(pts[1] + hh)))
    if b <= a or d <= c:
        return 0.0
    return float(np.abs(original[c:d, a:b].astype(np.int16) - anonymized[c:d, a:b].astype(np.int16)).mean())


class FacesLeft:
    """"Faces left" of one method on one clip, accumulated frame by frame: ``update(original, anonymized, faces)``
    per frame in order, then ``compute()``."""

    def __init__(self, min_change: float = MIN_CHANGE):
        self.min_change = min_change
        self.seen = 0
        self.left: list[int] = []
        self.index = 0

    def update(self, original: np.ndarray, anonymized: np.ndarray, faces: Sequence[tuple]) -> None:
        for box in faces:
            self.seen += 1
            if inner_change(original, anonymized, box) < self.min_change:
                self.left.append(self.index)
        self.index += 1

    def compute(self) -> dict:
        text = ", ".join(f"{x}-{y}" if x != y else f"{x}" for x, y in ranges(self.left))
        return {"faces_seen": self.seen, "faces_left": len(self.left), "faces_left_frames": text}


def faces_left(original: Iterable[np.ndarray], anonymized: Iterable[np.ndarray], faces: list[list[tuple]],
               min_change: float = MIN_CHANGE) -> dict:
    """``faces_seen``, ``faces_left`` and ``faces_left_frames`` ("a-b, c" ranges) of one method on one clip."""
    acc = FacesLeft(min_change)
    for a, b, fs in zip(original, anonymized, faces):
        acc.update(a, b, fs)
    return acc.compute()
