"""dlib identity descriptor on real photos: same person close, different people far."""
from __future__ import annotations

import numpy as np
import pytest

from anonymizer.faces import align_face, detect_faces
from anonymizer.identity import (
    SAME_PERSON_THRESHOLD,
    FaceRecognizer,
    descriptor_distance,
)
from keepr.images import load_image


@pytest.fixture(scope="module")
def recognizer():
    return FaceRecognizer()


@pytest.fixture(scope="module")
def photo(media_dir):
    def _load(name):
        if name.startswith("lisa"):
            return load_image(media_dir / "photos" / "lisa" / f"{name}.jpg")
        return load_image(media_dir / "photos" / "london_512" / f"{name}.jpg")
    return _load


def test_descriptor_shape_and_determinism(recognizer, photo):
    img = photo("001_neutral")
    a = recognizer.descriptor(img)
    b = recognizer.descriptor(img.copy())
    assert a.shape == (128,) and np.isfinite(a).all()
    assert np.array_equal(a, b)
    face = detect_faces(img)[0]
    assert np.array_equal(recognizer.descriptor(img, face), a)


@pytest.mark.parametrize("a,b", [("001_neutral", "001_smiling"), ("002_neutral", "002_smiling"),
                                 ("lisa1", "lisa2")])
def test_same_person_below_threshold(recognizer, photo, a, b):
    d = recognizer.distance(photo(a), photo(b))
    assert d is not None and d < SAME_PERSON_THRESHOLD


@pytest.mark.parametrize("a,b", [("001_neutral", "002_neutral"), ("003_neutral", "004_neutral"),
                                 ("lisa1", "005_neutral"), ("001_smiling", "005_smiling")])
def test_different_people_above_threshold(recognizer, photo, a, b):
    d = recognizer.distance(photo(a), photo(b))
    assert d is not None and d >= SAME_PERSON_THRESHOLD


def test_aligned_crop_keeps_identity(recognizer, photo):
    img = photo("003_smiling")
    face = detect_faces(img)[0]
    crop = align_face(img, face.landmarks, 256).image
    assert descriptor_distance(recognizer.descriptor(img), recognizer.descriptor(crop)) < 0.15


def test_no_face_gives_none(recognizer):
    blank = np.full((200, 200, 3), 90, np.uint8)
    assert recognizer.descriptor(blank) is None
    assert recognizer.distance(blank, blank) is None


def test_descriptor_distance():
    a = np.zeros(128)
    b = np.zeros(128)
    b[0] = 3.0
    b[1] = 4.0
    assert descriptor_distance(a, b) == pytest.approx(5.0)
    with pytest.raises(ValueError):
        descriptor_distance(a, np.zeros(64))
