"""Temporal stability of an anonymized face region: warping error, brightness flicker, identity-distance spread.

Warping error follows the usual video-consistency recipe: optical flow is estimated on the *original* frames (OpenCV
Farneback), the previous anonymized frame is warped with it onto the current one, and the mean absolute difference is
taken over the face region where the flow is reliable (forward-backward consistent, inside the image). A method that
keeps the face consistent with the real motion scores low; flicker, jumps and popping artefacts score high. Errors are
in 8-bit grey levels.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import cv2
import numpy as np

FARNEBACK = dict(pyr_scale=0.5, levels=3, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2, flags=0)


def to_gray(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)


def luma(rgb: np.ndarray) -> np.ndarray:
    """BT.601 luma as float32 in [0, 255]."""
    rgb = rgb.astype(np.float32)
    return 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]


def farneback_flow(src_gray: np.ndarray, dst_gray: np.ndarray) -> np.ndarray:
    """Dense flow [H,W,2] with ``src(y, x) ~ dst(y + f_y, x + f_x)``."""
    return cv2.calcOpticalFlowFarneback(src_gray, dst_gray, None, **FARNEBACK)


def warp_with_flow(image: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """Sample ``image`` at (x + f_x, y + f_y): brings the frame the flow points to onto the flow's source frame."""
    h, w = flow.shape[:2]
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    return cv2.remap(image, gx + flow[..., 0], gy + flow[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def consistent_flow_mask(fw: np.ndarray, bw: np.ndarray) -> np.ndarray:
    """True where the forward flow and the backward flow sampled at its target cancel out, and the target is inside.

    Occluded or badly estimated pixels fail the test ``|fw + bw(x+fw)|^2 < 0.01 (|fw|^2 + |bw(x+fw)|^2) + 0.5``.
    """
    h, w = fw.shape[:2]
    bw_at = warp_with_flow(bw, fw)
    lhs = ((fw + bw_at) ** 2).sum(-1)
    rhs = 0.01 * ((fw**2).sum(-1) + (bw_at**2).sum(-1)) + 0.5
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    tx, ty = gx + fw[..., 0], gy + fw[..., 1]
    inside = (tx >= 0) & (tx <= w - 1) & (ty >= 0) & (ty <= h - 1)
    return (lhs < rhs) & inside


def region(box: Sequence[float] | None, height: int, width: int, margin: float = 0.25) -> tuple[slice, slice] | None:
    """Slices of the face box grown by ``margin`` of its size on each side, clipped to the frame."""
    if box is None:
        return None
    x0, y0, x1, y1 = box
    mx, my = (x1 - x0) * margin, (y1 - y0) * margin
    xa, ya = max(0, int(np.floor(x0 - mx))), max(0, int(np.floor(y0 - my)))
    xb, yb = min(width, int(np.ceil(x1 + mx))), min(height, int(np.ceil(y1 + my)))
    if xb - xa < 2 or yb - ya < 2:
        return None
    return slice(ya, yb), slice(xa, xb)


def warping_error(
    original: Sequence[np.ndarray],
    anonymized: Sequence[np.ndarray],
    boxes: Sequence[Sequence[float] | None],
    margin: float = 0.25,
) -> np.ndarray:
    """Per frame pair (t-1, t): mean |anon_t - warp(anon_{t-1})| over the reliable part of the face region.

    Returns an array of length ``len(frames) - 1`` (NaN where either frame has no box or nothing is reliable).
    The flow is computed on the original frames, within the union of both frames' face regions.
    """
    n = len(original)
    if len(anonymized) != n or len(boxes) != n:
        raise ValueError(f"got {n} original frames, {len(anonymized)} anonymized frames and {len(boxes)} boxes")
    out = np.full(max(0, n - 1), np.nan)
    for t in range(1, n):
        if boxes[t] is None or boxes[t - 1] is None:
            continue
        h, w = original[t].shape[:2]
        union = (
            min(boxes[t][0], boxes[t - 1][0]),
            min(boxes[t][1], boxes[t - 1][1]),
            max(boxes[t][2], boxes[t - 1][2]),
            max(boxes[t][3], boxes[t - 1][3]),
        )
        sl = region(union, h, w, margin)
        if sl is None:
            continue
        cur, prev = to_gray(original[t][sl]), to_gray(original[t - 1][sl])
        fw = farneback_flow(cur, prev)  # current -> previous
        bw = farneback_flow(prev, cur)
        valid = consistent_flow_mask(fw, bw)
        if not valid.any():
            continue
        warped = warp_with_flow(anonymized[t - 1][sl].astype(np.float32), fw)
        diff = np.abs(anonymized[t][sl].astype(np.float32) - warped).mean(-1)
        out[t - 1] = float(diff[valid].mean())
    return out


def face_brightness(frames: Iterable[np.ndarray], boxes: Sequence[Sequence[float] | None], margin: float = 0.0) -> np.ndarray:
    """Mean luma of the face region per frame (NaN without a box)."""
    values = []
    for frame, box in zip(frames, boxes):
        sl = region(box, frame.shape[0], frame.shape[1], margin)
        values.append(np.nan if sl is None else float(luma(frame[sl]).mean()))
    return np.array(values)


def brightness_flicker(anonymized_brightness: np.ndarray, original_brightness: np.ndarray | None = None) -> dict[str, float]:
    """Mean |frame-to-frame change| of the face's mean luma; with the original's, also the change it does not explain.

    ``flicker`` is the raw mean absolute change (grey levels per frame); ``flicker_excess`` is the mean absolute
    difference between the anonymized and the original change, i.e. brightness jumps the real video does not have.
    """
    da = np.diff(np.asarray(anonymized_brightness, dtype=np.float64))
    out = {"flicker": float(np.nanmean(np.abs(da))) if np.isfinite(da).any() else float("nan")}
    if original_brightness is not None:
        do = np.diff(np.asarray(original_brightness, dtype=np.float64))
        ex = np.abs(da - do)
        out["flicker_excess"] = float(np.nanmean(ex)) if np.isfinite(ex).any() else float("nan")
    return out


def identity_spread(distances: np.ndarray) -> float:
    """Standard deviation of the per-frame identity distance (how much the virtual identity wobbles)."""
    d = np.asarray(distances, dtype=np.float64)
    d = d[np.isfinite(d)]
    return float(d.std()) if len(d) else float("nan")


def temporal_summary(original, anonymized, boxes, distances=None) -> dict[str, float]:
    """All temporal-stability numbers for one clip and one method."""
    we = warping_error(original, anonymized, boxes)
    out = {"warping_error": float(np.nanmean(we)) if np.isfinite(we).any() else float("nan")}
    out.update(brightness_flicker(face_brightness(anonymized, boxes), face_brightness(original, boxes)))
    if distances is not None:
        out["identity_distance_spread"] = identity_spread(distances)
    return out
