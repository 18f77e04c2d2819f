"""Identity descriptor: dlib's ResNet face recognition model (128-d, from ``face-recognition-models``).

Two faces whose descriptors are closer than 0.6 (Euclidean) are, by dlib's calibration on LFW, the same person.
KEEP:R uses that the other way round: a virtual face must be at least ``SAME_PERSON_THRESHOLD`` away from the person
it replaces (the identity guard in :mod:`anonymizer.candidates`).
"""
from __future__ import annotations

import functools

import numpy as np

from anonymizer.faces import Face, detect_faces, model_path
from keepr.images import to_rgb_uint8

__all__ = ["SAME_PERSON_THRESHOLD", "FaceRecognizer", "descriptor_distance"]

SAME_PERSON_THRESHOLD = 0.6  # dlib's same-person decision threshold for this model


@functools.lru_cache(maxsize=None)
def _recognition_model():
    import dlib  # heavy (dlib): only in _recognition_model()
    return dlib.face_recognition_model_v1(model_path("recognition"))


def _full_object_detection(face: Face):
    import dlib  # heavy (dlib): only in _full_object_detection()
    b = face.detector_box or face.box
    rect = dlib.rectangle(int(b[0]), int(b[1]), int(b[2]) - 1, int(b[3]) - 1)
    pts = dlib.points([dlib.point(int(round(x)), int(round(y))) for x, y in np.asarray(face.landmarks)])
    return dlib.full_object_detection(rect, pts)


class FaceRecognizer:
    """Computes 128-d identity descriptors with dlib's ResNet model.

    detector / upsample: how faces are found when ``descriptor`` is not given one (see
    :func:`anonymizer.faces.detect_faces`). num_jitters: dlib's test-time augmentation (0 = none, deterministic
    and fastest; dlib suggests 10-100 for a slightly more accurate descriptor).
    """

    def __init__(self, detector: str = "hog", upsample: int = 1, num_jitters: int = 0):
        self.detector = detector    # face detector used when no face is given
        self.upsample = upsample    # detector upsampling steps
        self.num_jitters = num_jitters  # dlib jitter count; 0 keeps descriptors deterministic
        self._model = _recognition_model()

    def descriptor(self, rgb: np.ndarray, face: Face | None = None) -> np.ndarray | None:
        """Descriptor float64 [128] of ``face`` in ``rgb`` (the largest detected face when ``face`` is None);
        None when no face is found."""
        rgb = to_rgb_uint8(rgb)
        if face is None:
            faces = detect_faces(rgb, self.detector, self.upsample)
            if not faces:
                return None
            face = faces[0]
        shape = _full_object_detection(face)
        if self.num_jitters > 0:
            d = self._model.compute_face_descriptor(rgb, shape, self.num_jitters)
        else:
            d = self._model.compute_face_descriptor(rgb, shape)
        return np.asarray(d, dtype=np.float64)

    def distance(self, rgb_a: np.ndarray, rgb_b: np.ndarray) -> float | None:
        """Descriptor distance between the largest faces of two images; None if either has no face."""
        a = self.descriptor(rgb_a)
        if a is None:
            return None
        b = self.descriptor(rgb_b)
        if b is None:
            return None
        return descriptor_distance(a, b)


def descriptor_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Euclidean distance between two descriptors (same person below ``SAME_PERSON_THRESHOLD``)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"descriptor shapes differ: {a.shape} vs {b.shape}")
    return float(np.linalg.norm(a - b))
