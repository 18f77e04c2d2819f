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


def pair_warping_error(
    original_prev: np.ndarray,
    original: np.ndarray,
    anonymized_prev: np.ndarray,
    anonymized: np.ndarray,
    box_prev: Sequence[float] | None,
    box: Sequence[float] | None,
    margin: float = 0.25,
) -> float:
    """Warping error of one frame pair (t-1, t): mean |anon_t - warp(anon_{t-1})| over the reliable part of the
    face region (flow on the original frames, within the union of both frames' face regions); NaN where either frame
    has no box or nothing is reliable."""
    if box is None or box_prev is None:
        return float("nan")
    h, w = original.shape[:2]
    union = (min(box[0], box_prev[0]), min(box[1], box_prev[1]), max(box[2], box_prev[2]), max(box[3], box_prev[3]))
    sl = region(union, h, w, margin)
    if sl is None:
        return float("nan")
    cur, prev = to_gray(original[sl]), to_gray(original_prev[sl])
    fw = farneback_flow(cur, prev)  # current -> previous
    bw = farneback_flow(prev, cur)
    valid = consistent_flow_mask(fw, bw)
    if not valid.any():
        return float("nan")
    warped = warp_with_flow(anonymized_prev[sl].astype(np.float32), fw)
    diff = np.abs(anonymized[sl].astype(np.float32) - warped).mean(-1)
    return float(diff[valid].mean())


def warping_error(
    original: Sequence[np.ndarray],
    anonymized: Sequence[np.ndarray],
    boxes: Sequence[Sequence[float] | None],
    margin: float = 0.25,
) -> np.ndarray:
    """Per frame pair (t-1, t): :func:`pair_warping_error`.

    Returns an array of length ``len(frames) - 1`` (NaN where either frame has no box or nothing is reliable).
    """
    n = len(original)
    if len(anonymized) != n or len(boxes) != n:
        raise ValueError(f"got {n} original frames, {len(anonymized)} anonymized frames and {len(boxes)} boxes")
    out = np.full(max(0, n - 1), np.nan)
    for t in range(1, n):
        out[t - 1] = pair_warping_error(original[t - 1], original[t], anonymized[t - 1], anonymized[t],
                                        boxes[t - 1], boxes[t], margin)
    return out


def region_brightness(frame: np.ndarray, box: Sequence[float] | None, margin: float = 0.0) -> float:
    """Mean luma of one frame's face region (NaN without a box)."""
    sl = region(box, frame.shape[0], frame.shape[1], margin)
    return np.nan if sl is None else float(luma(frame[sl]).mean())


def face_brightness(frames: Iterable[np.ndarray], boxes: Sequence[Sequence[float] | None],
                    margin: float = 0.0) -> np.ndarray:
    """Mean luma of the face region per frame (NaN without a box)."""
    return np.array([region_brightness(frame, box, margin) for frame, box in zip(frames, boxes)])


def brightness_flicker(anonymized_brightness: np.ndarray,
                       original_brightness: np.ndarray | None = None) -> dict[str, float]:
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


class TemporalStability:
    """The temporal numbers of one clip and one method, accumulated frame by frame (only the previous frame is
    kept): ``update(original, anonymized, box)`` per frame in order, then ``compute(distances)``."""

    def __init__(self, margin: float = 0.25):
        self.margin = margin
        self.warp: list[float] = []
        self.brightness_anon: list[float] = []
        self.brightness_orig: list[float] = []
        self._prev: tuple | None = None  # (original, anonymized, box) of the previous frame

    def update(self, original: np.ndarray, anonymized: np.ndarray, box: Sequence[float] | None) -> None:
        if self._prev is not None:
            self.warp.append(pair_warping_error(self._prev[0], original, self._prev[1], anonymized, self._prev[2],
                                                box, self.margin))
        self._prev = (original, anonymized, box)
        self.brightness_anon.append(region_brightness(anonymized, box))
        self.brightness_orig.append(region_brightness(original, box))

    def compute(self, distances: np.ndarray | None = None) -> dict[str, float]:
        we = np.array(self.warp, dtype=np.float64)
        out = {"warping_error": float(np.nanmean(we)) if np.isfinite(we).any() else float("nan")}
        out.update(brightness_flicker(np.array(self.brightness_anon), np.array(self.brightness_orig)))
        if distances is not None:
            out["identity_distance_spread"] = identity_spread(distances)
        return out


def temporal_summary(original, anonymized, boxes, distances=None) -> dict[str, float]:
    """All temporal-stability numbers for one clip and one method (in-memory frames; see :class:`TemporalStability`
    for the streamed form, which gives the same numbers)."""
    n = len(original)
    if len(anonymized) != n or len(boxes) != n:
        raise ValueError(f"got {n} original frames, {len(anonymized)} anonymized frames and {len(boxes)} boxes")
    acc = TemporalStability()
    for o, a, b in zip(original, anonymized, boxes):
        acc.update(o, a, b)
    return acc.compute(distances)
