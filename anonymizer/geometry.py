"""Affine geometry between a frame and its crops: matrices, warps back into the frame, feather masks.

A crop (the co-part framing of :mod:`anonymizer.crop`, the FFHQ alignment of :mod:`anonymizer.faces`) is a 2x3
affine map from frame to crop in pixel-centre coordinates: pixel (i, j) covers [j-0.5, j+0.5] x [i-0.5, i+0.5],
points are (x, y). Its inverse takes a crop (and a mask in crop pixels) back into the frame; :mod:`anonymizer.blend`
pastes with it.
"""
from __future__ import annotations

import cv2
import numpy as np


def transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply a 2x3 affine to points [...,2] (x, y)."""
    p = np.asarray(points, dtype=np.float64)
    m = np.asarray(matrix, dtype=np.float64)
    return p @ m[:, :2].T + m[:, 2]


def invert_affine(m: np.ndarray) -> np.ndarray:
    """The inverse of a 2x3 affine."""
    full = np.vstack([np.asarray(m, dtype=np.float64), [0.0, 0.0, 1.0]])
    return np.linalg.inv(full)[:2]


def compose(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Affine ``a after b`` (apply b, then a)."""
    return (np.vstack([a, [0, 0, 1]]) @ np.vstack([b, [0, 0, 1]]))[:2]


def crop_region(inverse: np.ndarray, crop_hw: tuple[int, int], frame_hw: tuple[int, int], pad: int = 2):
    """Integer bounding box (x0, y0, x1, y1) in the frame of a crop's footprint, clipped; None if outside."""
    ch, cw = crop_hw
    corners = np.array([[-0.5, -0.5], [-0.5, ch - 0.5], [cw - 0.5, ch - 0.5], [cw - 0.5, -0.5]])
    pts = transform_points(corners, inverse)
    h, w = frame_hw
    x0 = max(0, int(np.floor(pts[:, 0].min())) - pad)
    y0 = max(0, int(np.floor(pts[:, 1].min())) - pad)
    x1 = min(w, int(np.ceil(pts[:, 0].max())) + pad + 1)
    y1 = min(h, int(np.ceil(pts[:, 1].max())) + pad + 1)
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1, y1


def warp_to_frame(crop: np.ndarray, inverse: np.ndarray, frame_hw: tuple[int, int],
                  interpolation: int = cv2.INTER_LINEAR):
    """Warp a crop (any channels/dtype cv2 supports) back into frame coordinates through ``inverse`` (crop -> frame).

    Returns (patch, region): ``patch`` is the warped crop over ``region`` = (x0, y0, x1, y1) of the frame only
    (the crop's footprint, clipped), which keeps this cheap on large frames; (None, None) if the crop lies
    outside the frame. Outside the crop's footprint the patch is 0.
    """
    region = crop_region(inverse, crop.shape[:2], frame_hw)
    if region is None:
        return None, None
    x0, y0, x1, y1 = region
    shift = np.array([[1.0, 0.0, -x0], [0.0, 1.0, -y0]])
    m = shift @ np.vstack([np.asarray(inverse, dtype=np.float64), [0, 0, 1]])
    patch = cv2.warpAffine(crop, m, (x1 - x0, y1 - y0), flags=interpolation, borderMode=cv2.BORDER_CONSTANT,
                           borderValue=0)
    return patch, region


def border_feather_mask(size: int, feather: float = 0.05) -> np.ndarray:
    """float32 [size,size] mask: 1 inside, falling linearly to 0 over ``feather * size`` px at the border."""
    ramp = max(1.0, feather * size)
    c = np.arange(size, dtype=np.float32)
    d = np.minimum(c + 0.5, size - 0.5 - c)  # distance from the nearest edge
    r = np.clip(d / ramp, 0.0, 1.0)
    return np.minimum(r[:, None], r[None, :]).astype(np.float32)
