"""Reading images and pixel conversions, one convention for the whole repository.

:func:`load_image` reads any image file as uint8 RGB; :func:`to_rgb_uint8` brings any common image array there.

The generator's images become uint8 as in NVlabs' ``generate.py`` (``x * 127.5 + 128``, then truncation, i.e. rounding
to the nearest level); uint8 images enter the encoder as ``x / 127.5 - 1`` (NVlabs' dataset loader). Pairs, encoder
training, evaluation and the virtual faces all use these two functions, so an image goes through the same numbers
wherever it is made.
"""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import torch

from keepr.errors import KeeprError


def to_uint8(img: torch.Tensor) -> torch.Tensor:
    """Generator output (nominally [-1, 1]) to uint8, NVlabs convention: ``(img * 127.5 + 128).clamp(0, 255)``."""
    return (img * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def to_float_image(image: torch.Tensor) -> torch.Tensor:
    """uint8 [N,3,H,W] in [0,255] -> float in [-1,1] (floats are passed through)."""
    if image.dtype == torch.uint8:
        return image.float() / 127.5 - 1.0
    return image.float()


def to_rgb_uint8(image: np.ndarray, name: str = "image") -> np.ndarray:
    """Any common image array -> contiguous uint8 RGB [H,W,3].

    Accepts 2-D grayscale, [H,W,1], RGB and RGBA (alpha is dropped: the colour channels are kept as they are),
    uint8, uint16 (scaled by 1/257), bool and floats in [0,1]. Anything else raises KeeprError.
    """
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise KeeprError(f"{name}: expected an HxW, HxWx1, HxWx3 or HxWx4 image, got shape {tuple(a.shape)}")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise KeeprError(f"{name}: empty image of shape {tuple(a.shape)}")
    a = a[:, :, :3]
    if a.dtype == np.uint8:
        pass
    elif a.dtype == np.uint16:
        a = np.round(a.astype(np.float32) / 257.0).astype(np.uint8)
    elif a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)):
            raise KeeprError(f"{name}: image contains NaN or infinite values")
        a = np.round(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)
    else:
        raise KeeprError(f"{name}: unsupported image dtype {a.dtype}")
    return np.ascontiguousarray(a)


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as uint8 RGB [H,W,3]; grayscale, RGBA and 16-bit files are converted.

    Raises KeeprError naming the file when it is missing or cannot be decoded. The first frame of an animated
    GIF is used.
    """
    path = Path(path)
    if not path.is_file():
        raise KeeprError(f"{path}: image file not found")
    data = np.fromfile(str(path), dtype=np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if img is not None:
        if img.ndim == 3 and img.shape[2] == 4:
            img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGBA)
        elif img.ndim == 3 and img.shape[2] == 3:
            img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        return to_rgb_uint8(img, str(path))
    try:  # formats OpenCV lacks (e.g. GIF in some builds)
        from PIL import Image  # heavy (PIL): only in load_image()
        with Image.open(path) as im:
            im.seek(0)
            return to_rgb_uint8(np.asarray(im.convert("RGB")), str(path))
    except Exception as exc:  # noqa: BLE001 -- any decoder failure means "unreadable"
        raise KeeprError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from None
