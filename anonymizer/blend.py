"""Paste a part-swapped crop back into its full frame with a feathered mask, in the frame's original geometry.

The mask says where the swapped crop replaces the frame. It starts from the co-part model's soft mask of the swapped
parts (or the whole crop when none is given), is grown by ``dilate`` px and blurred by ``blur`` px (Gaussian sigma),
both relative to a 256 px crop so the look does not depend on the model's size, and is multiplied by a ramp that
falls to 0 over ``border`` of the crop side at the crop's edges, so no seam can appear where the crop ends. Crop and
mask are warped back to the frame with the inverse of the crop transform (bilinear) and alpha-blended over the
crop's footprint only: every pixel outside it is returned bit-identical.
"""
from __future__ import annotations

import cv2
import numpy as np

from anonymizer.geometry import border_feather_mask, warp_to_frame


def feather_mask(mask: np.ndarray | None, size: int, dilate: float = 6.0, blur: float = 6.0,
                 border: float = 0.06) -> np.ndarray:
    """float32 [size,size] in [0,1]: the (optional) part mask grown, blurred and faded out at the crop border.

    dilate/blur are in pixels of a 256 px crop (scaled with ``size``); border is a fraction of the crop side.
    """
    k = size / 256.0
    if mask is None:
        m = np.ones((size, size), np.float32)
    else:
        m = np.clip(np.asarray(mask, dtype=np.float32).reshape(size, size), 0.0, 1.0)
        d = int(round(dilate * k))
        if d > 0:
            m = cv2.dilate(m, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * d + 1, 2 * d + 1)))
        sigma = blur * k
        if sigma > 0:
            m = cv2.GaussianBlur(m, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REPLICATE)
    return (m * border_feather_mask(size, border)).astype(np.float32)


def paste(frame: np.ndarray, crop: np.ndarray, crop_to_frame: np.ndarray, mask: np.ndarray,
          out: np.ndarray | None = None) -> np.ndarray:
    """Blend ``crop`` (uint8 [S,S,3]) into ``frame`` (uint8 [H,W,3]) through ``crop_to_frame`` (2x3) with ``mask``
    (float [S,S] in [0,1], crop coordinates). Writes into ``out`` (default: a copy of ``frame``) and returns it."""
    if out is None:
        out = frame.copy()
    elif out is not frame:
        out[...] = frame
    patch, region = warp_to_frame(np.ascontiguousarray(crop), crop_to_frame, frame.shape[:2])
    if patch is None:
        return out
    alpha, _ = warp_to_frame(np.ascontiguousarray(mask, dtype=np.float32), crop_to_frame, frame.shape[:2])
    x0, y0, x1, y1 = region
    a = np.clip(alpha, 0.0, 1.0)[:, :, None]
    dst = frame[y0:y1, x0:x1].astype(np.float32)
    blended = dst + (patch.astype(np.float32) - dst) * a
    out[y0:y1, x0:x1] = np.where(a > 0, np.clip(np.rint(blended), 0, 255), dst).astype(np.uint8)
    return out
