"""Regions of dlib's 68-point face landmarks, named once for every module that reads them.

Right/left are the subject's: the subject's right eye is on the image's left.
"""
from __future__ import annotations

JAW = slice(0, 17)
BROWS = slice(17, 27)
BROW_RIGHT = slice(17, 22)  # image left
BROW_LEFT = slice(22, 27)
NOSE = slice(27, 36)
EYE_RIGHT = slice(36, 42)  # image-left eye
EYE_LEFT = slice(42, 48)  # image-right eye
MOUTH_OUTER = slice(48, 60)
MOUTH_INNER = slice(60, 68)

CHIN = 8  # tip of the jaw line
NOSE_TIP = 30
EYE_RIGHT_OUTER = 36  # outer corner of the image-left eye
EYE_LEFT_OUTER = 45  # outer corner of the image-right eye
MOUTH_CORNER_RIGHT = 48
MOUTH_CORNER_LEFT = 54
