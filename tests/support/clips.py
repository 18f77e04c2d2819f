"""Test clips made from the bundled media, written with PyAV (nothing large is stored in the repository)."""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def frames_of(path, limit: int | None = None) -> list[np.ndarray]:
    """Decoded RGB frames of a bundled clip (upright)."""
    from anonymizer.video import VideoReader

    out = []
    for f in VideoReader(path):
        if limit is not None and len(out) >= limit:
            break
        out.append(f.image)
    return out


def write_clip(path, frames, fps=25, rotate_ccw: int = 0, crf: int = 12) -> Path:
    """H.264 mp4 of ``frames``; with ``rotate_ccw`` the pixels are stored turned sideways and a display matrix says
    how to turn them upright (what a phone writes)."""
    path = Path(path)
    first = frames[0]
    k = -rotate_ccw // 90
    with av.open(str(path), "w") as c:
        v = c.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stored = np.rot90(first, k=k)
        v.height, v.width = stored.shape[:2]
        v.pix_fmt = "yuv420p"
        v.options = {"crf": str(crf), "preset": "veryfast"}
        if rotate_ccw:
            v.set_display_rotation(rotate_ccw)
        for img in frames:
            img = np.ascontiguousarray(np.rot90(img, k=k))
            for p in v.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in v.encode(None):
            c.mux(p)
    return path


def hard_cut(src, dst, shift: int = 360) -> Path:
    """The clip twice in a row on a canvas ``shift`` px wider, the second time moved ``shift`` px right (a cut)."""
    frames = frames_of(src)
    h, w = frames[0].shape[:2]
    out = []
    for k in range(2):
        for img in frames:
            canvas = np.zeros((h, w + shift, 3), np.uint8)
            canvas[:, k * shift:k * shift + w] = img
            out.append(canvas)
    return write_clip(dst, out)


def first_frames(src, dst, n: int, fps=None) -> Path:
    """The first ``n`` frames of a clip as mp4 (at the clip's frame rate)."""
    from anonymizer.video import probe_video

    return write_clip(dst, frames_of(src, n), fps=fps or probe_video(src).fps)


def portrait_sideways(src, dst, turn_ccw: int = 90, n: int = 20) -> Path:
    """A portrait crop of a clip's first ``n`` frames, stored sideways with a display rotation (a phone clip)."""
    frames = frames_of(src, n)
    h, w = frames[0].shape[:2]
    pw = (h * 3 // 4) // 2 * 2
    x0 = (w - pw) // 2
    return write_clip(dst, [np.ascontiguousarray(f[:, x0:x0 + pw]) for f in frames], rotate_ccw=turn_ccw)


def gradient_video(path, n: int = 12, size=(160, 120)) -> Path:
    """A short mp4 of a moving gradient: a video with no face."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    frames = [np.stack([(xx + 4 * i) % 256, yy * 2 % 256, np.full_like(xx, 90)], -1).astype(np.uint8)
              for i in range(n)]
    return write_clip(path, frames, crf=18)
