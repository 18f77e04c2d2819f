"""Pixel conversions between uint8 images and the generator's [-1, 1] range, one convention for the whole repository.

The generator's images become uint8 as in NVlabs' ``generate.py`` (``x * 127.5 + 128``, then truncation, i.e. rounding
to the nearest level); uint8 images enter the encoder as ``x / 127.5 - 1`` (NVlabs' dataset loader). Pairs, encoder
training, evaluation and the virtual faces all use these two functions, so an image goes through the same numbers
wherever it is made.
"""
from __future__ import annotations

import torch


def to_uint8(img: torch.Tensor) -> torch.Tensor:
    """Generator output (nominally [-1, 1]) to uint8, NVlabs convention: ``(img * 127.5 + 128).clamp(0, 255)``."""
    return (img * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def to_float_image(image: torch.Tensor) -> torch.Tensor:
    """uint8 [N,3,H,W] in [0,255] -> float in [-1,1] (floats are passed through)."""
    if image.dtype == torch.uint8:
        return image.float() / 127.5 - 1.0
    return image.float()
