"""Pixel methods for a face region: blur, mosaic, black box, or nothing.

They serve twice: as the pipeline's *fallback* (``--fallback``), applied to every face region of a chosen person
that the part swap does not cover (frames before a track starts or after it ends, faces the tracker rejected), and
as the baselines KEEP:R is compared with in ``eval/``. Each acts on the face box grown by ``margin`` of its size on
each side (dlib's box is tight around brows-to-chin; the margin covers forehead, cheeks and chin as a human editor
would), with a strength tied to the face size so that small and large faces are treated alike.
"""
from __future__ import annotations

from typing import Callable, Sequence

import cv2
import numpy as np

from keepr.errors import KeeprError

Box = Sequence[float]

METHODS = ("blur", "mosaic", "blackbox", "none")


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
    sigma = max(1.0, sigma_frac * box_side(box))
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
    cell = max(1.0, box_side(box) / blocks)
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


REGION_OPS: dict[str, Callable[..., np.ndarray]] = {
    "none": identity_region,
    "blur": blur_region,
    "mosaic": mosaic_region,
    "blackbox": blackbox_region,
}


def apply_region(frame: np.ndarray, box: Box, method: str, margin: float = 0.2) -> np.ndarray:
    """``method`` ('blur', 'mosaic', 'blackbox' or 'none') applied to ``box`` of ``frame``; returns a new frame."""
    if method not in REGION_OPS:
        raise KeeprError(f"unknown fallback {method!r}; choose from {', '.join(METHODS)}")
    return REGION_OPS[method](frame, box, margin=margin)
