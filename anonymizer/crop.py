"""The co-part framing: one square crop rule for the virtual face (source) and for every video frame (driving).

Motion-supervised co-part segmentation is trained on VoxCeleb clips cropped to a square around the head, so a face
must fill a similar part of the crop at inference. The rule here: from a face box (x0, y0, x1, y1), the crop is a
square of side ``scale * max(w, h)`` centred on the box centre moved by ``shift_y * h`` (negative = up: dlib's boxes
stop at the eyebrows, so the head's centre is above the box centre), resized to the model's ``img_size``.

A crop is an affine map (2x3, pixel-centre coordinates) from frame to crop; the same map inverted pastes the swapped
crop back in the original geometry (:mod:`anonymizer.blend`). Parts of a crop outside the frame are filled by
replicating the border (the model sees no black bars); they are never pasted back.

For the source, the virtual face exists only as an FFHQ-aligned generated image. ``crop_aligned`` applies the same
rule to the target's face box of its best frame and maps it through that frame's alignment transform into the
generated image, so the virtual face lands in the crop exactly where the target's face would be.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

from anonymizer.geometry import compose, invert_affine


@dataclass(frozen=True)
class CropBox:
    """An axis-aligned square in frame coordinates: centre (cx, cy) and side, all in pixels (float)."""

    cx: float
    cy: float
    side: float

    @property
    def corners(self) -> tuple[float, float, float, float]:
        h = self.side / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)

    def as_list(self) -> list[float]:
        return [round(v, 2) for v in self.corners]


def crop_box(face_box: Sequence[float], scale: float = 1.8, shift_y: float = -0.1) -> CropBox:
    """The square crop for a face box (x0, y0, x1, y1).

    Side ``scale * max(w, h)``, centre shifted by ``shift_y * h``.
    """
    x0, y0, x1, y1 = (float(v) for v in face_box)
    w, h = x1 - x0, y1 - y0
    if w <= 0 or h <= 0:
        raise ValueError(f"empty face box {face_box}")
    return CropBox((x0 + x1) / 2, (y0 + y1) / 2 + shift_y * h, scale * max(w, h))


def crop_matrix(box: CropBox, size: int) -> np.ndarray:
    """2x3 affine frame -> crop of side ``size`` (pixel centres: the square's outer edges map to -0.5 and size-0.5)."""
    s = size / box.side
    x0, y0 = box.cx - box.side / 2, box.cy - box.side / 2
    # x_crop + 0.5 = (x_frame + 0.5 - x0) * s  (x0 is an edge, pixel centres sit at +0.5)
    return np.array([[s, 0.0, (0.5 - x0) * s - 0.5], [0.0, s, (0.5 - y0) * s - 0.5]], dtype=np.float64)


def crop_frame(rgb: np.ndarray, box: CropBox, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut the square ``box`` out of ``rgb`` resized to ``size``; returns (crop uint8 [size,size,3], crop -> frame 2x3).

    Downscaling uses area averaging when the square is much larger than ``size`` (no aliasing), else bilinear.
    """
    m = crop_matrix(box, size)
    if box.side > 2 * size:
        # Shrink the frame region first with area interpolation, then the bilinear warp is close to 1:1.
        x0, y0, x1, y1 = box.corners
        h, w = rgb.shape[:2]
        pad = int(np.ceil(box.side * 0.02)) + 2
        rx0, ry0 = max(0, int(np.floor(x0)) - pad), max(0, int(np.floor(y0)) - pad)
        rx1, ry1 = min(w, int(np.ceil(x1)) + pad), min(h, int(np.ceil(y1)) + pad)
        if rx1 > rx0 and ry1 > ry0:
            f = (2 * size) / box.side
            sub = rgb[ry0:ry1, rx0:rx1]
            sw, sh = max(1, int(round(sub.shape[1] * f))), max(1, int(round(sub.shape[0] * f)))
            small = cv2.resize(sub, (sw, sh), interpolation=cv2.INTER_AREA)
            fx, fy = sw / sub.shape[1], sh / sub.shape[0]
            # small pixel <- frame pixel: x_s = (x - rx0 + 0.5) * fx - 0.5
            to_small = np.array([[fx, 0, (0.5 - rx0) * fx - 0.5], [0, fy, (0.5 - ry0) * fy - 0.5]])
            warp = compose(m, invert_affine(to_small))
            crop = cv2.warpAffine(small, warp, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
            return crop, invert_affine(m)
    crop = cv2.warpAffine(rgb, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return crop, invert_affine(m)


def crop_aligned(aligned_rgb: np.ndarray, align_matrix: np.ndarray, align_size: int, box: CropBox,
                 size: int) -> np.ndarray:
    """The crop ``box`` (frame coordinates) taken from an aligned image instead of the frame.

    ``align_matrix`` maps frame -> aligned coordinates of an aligned crop of side ``align_size``; ``aligned_rgb`` may
    have another resolution (e.g. the generator's), it is treated as the same square rescaled.
    """
    r = aligned_rgb.shape[0]
    f = r / float(align_size)
    rescale = np.array([[f, 0, 0.5 * f - 0.5], [0, f, 0.5 * f - 0.5]])  # aligned(align_size) -> aligned(r)
    crop_to_frame = invert_affine(crop_matrix(box, size))
    crop_to_img = compose(rescale, compose(np.asarray(align_matrix, dtype=np.float64), crop_to_frame))
    return cv2.warpAffine(aligned_rgb, crop_to_img, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REPLICATE)
