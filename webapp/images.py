"""Pictures for the page: PNG files written atomically, and the co-part segmentation overlay of a virtual face."""
from __future__ import annotations

import io
import os
from pathlib import Path

import cv2
import numpy as np

# One colour per co-part segment (index 1..K; 0 is the background, left untinted). Readable on skin and hair.
PALETTE = ["#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
           "#fabed4", "#469990", "#dcbeff", "#9a6324", "#fffac8", "#800000", "#aaffc3", "#808000", "#ffd8b1",
           "#000075", "#a9a9a9"]


def part_colour(k: int) -> str:
    """Hex colour of segment ``k`` (1-based)."""
    return PALETTE[(int(k) - 1) % len(PALETTE)]


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    return tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))


def write_png(path: Path, image: np.ndarray) -> None:
    """An RGB uint8 image as a PNG at ``path``, via a temporary name renamed into place."""
    from PIL import Image  # heavy (PIL): only in write_png()

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG", optimize=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)


def segment_labels(crop: np.ndarray, coseg) -> np.ndarray:
    """Per-pixel co-part segment (0 = background, 1..K) of an RGB crop, at the crop's size."""
    import torch  # heavy (torch): only in segment_labels()

    from anonymizer.render import to_tensor  # heavy (av): only in segment_labels()

    with torch.no_grad():
        seg = coseg.segment(to_tensor([crop], coseg.device))["segmentation"]
    labels = seg[0].float().argmax(0).to(torch.uint8).cpu().numpy()
    h, w = crop.shape[:2]
    return cv2.resize(labels, (w, h), interpolation=cv2.INTER_NEAREST)


def part_overlay(crop: np.ndarray, labels: np.ndarray, num_segments: int, size: int = 384,
                 alpha: float = 0.45) -> tuple[np.ndarray, list[dict]]:
    """The crop with each segment tinted in its colour, outlined and numbered at its most inner point.

    Returns (RGB image ``size`` x ``size``, one dict per segment 1..K: index, colour, area (fraction of the crop),
    centre (x, y in 0..1, None when the segment is empty))."""
    base = cv2.resize(crop, (size, size), interpolation=cv2.INTER_CUBIC if crop.shape[0] < size else cv2.INTER_AREA)
    lab = cv2.resize(labels.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST)
    out = base.astype(np.float32)
    tint = np.zeros_like(out)
    for k in range(1, num_segments + 1):
        tint[lab == k] = _rgb(part_colour(k))
    fg = (lab > 0)[..., None]
    out = np.where(fg, (1 - alpha) * out + alpha * tint, out)
    edges = cv2.morphologyEx(lab, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0
    out[edges] = 0.5 * out[edges] + 127
    out = np.clip(out, 0, 255).astype(np.uint8)
    parts = []
    for k in range(1, num_segments + 1):
        mask = (lab == k).astype(np.uint8)
        area = float(mask.mean())
        centre = None
        if mask.sum() >= 12:
            dist = cv2.distanceTransform(np.pad(mask, 1), cv2.DIST_L2, 3)[1:-1, 1:-1]
            y, x = np.unravel_index(int(dist.argmax()), dist.shape)
            centre = (round(x / size, 4), round(y / size, 4))
            text = str(k)
            scale = size / 384 * 0.8
            (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 2)
            org = (int(np.clip(x - tw / 2, 1, size - tw - 1)), int(np.clip(y + th / 2, th + 1, size - 2)))
            cv2.putText(out, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 5, cv2.LINE_AA)
            cv2.putText(out, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 2, cv2.LINE_AA)
        parts.append({"index": k, "colour": part_colour(k), "area": round(area, 4), "centre": centre})
    return out, parts
