"""Skin colour matching on aligned real photos of two different people, plus synthetic hue-wrap checks."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from anonymizer.faces import align_face, aligned_face_landmarks, detect_faces
from anonymizer.skin import (
    SkinTone,
    dominant_skin_tone,
    hsv_to_rgb,
    hue_difference,
    match_skin_tone,
    plausible_skin,
    rgb_to_hsv,
    skin_mask,
    skin_region_mask,
    transfer_tone,
)
from keepr.errors import KeeprError
from keepr.images import load_image

SIZE = 256


@pytest.fixture(scope="module")
def aligned(media_dir):
    cache = {}

    def _get(name):
        if name not in cache:
            sub = "lisa" if name.startswith("lisa") else "london_512"
            img = load_image(media_dir / "photos" / sub / f"{name}.jpg")
            face = detect_faces(img)[0]
            cache[name] = align_face(img, face.landmarks, SIZE).image
        return cache[name]
    return _get


PAIRS = [("001_neutral", "002_neutral"), ("003_neutral", "004_neutral"), ("lisa1", "005_neutral"),
         ("002_smiling", "001_smiling"), ("005_smiling", "lisa2")]


@pytest.mark.parametrize("cand_name,target_name", PAIRS)
def test_match_skin_tone_real_pairs(aligned, cand_name, target_name):
    cand, target = aligned(cand_name), aligned(target_name)
    out, info = match_skin_tone(cand, target, return_info=True)
    assert out.shape == cand.shape and out.dtype == np.uint8
    assert info.candidate_detected and info.target_detected
    # The pairs differ in tone to start with, so the test measures a real change.
    before = dominant_skin_tone(cand)
    after = dominant_skin_tone(out)  # measured afresh: landmarks and mask found on the result itself
    goal = dominant_skin_tone(target)
    assert abs(hue_difference(after.hue, goal.hue)) <= 4.0, (before, after, goal)
    assert abs(after.saturation - goal.saturation) <= 0.04, (before, after, goal)
    # Shading kept: V = max(R, G, B) is unchanged up to rounding, everywhere.
    assert np.abs(out.max(axis=2).astype(int) - cand.max(axis=2).astype(int)).max() <= 1
    # Outside the feathered mask: bit-identical.
    outside = info.mask == 0
    assert outside.mean() > 0.3
    assert np.array_equal(out[outside], cand[outside])
    # ... and the mask stays on the face: nothing changes farther than the feather (4 sigma = 0.08 * 256 px)
    # from the landmark face region (jaw line up to the forehead band).
    lm, _ = aligned_face_landmarks(cand)
    region = skin_region_mask(cand.shape[:2], lm)
    pts = cv2.findNonZero(region)
    hull = np.zeros(cand.shape[:2], np.uint8)
    cv2.fillConvexPoly(hull, cv2.convexHull(pts), 1)
    far = cv2.dilate(hull, np.ones((45, 45), np.uint8)) == 0
    assert far.mean() > 0.3
    assert np.array_equal(out[far], cand[far])
    # Inside the mask the colour did move.
    assert np.abs(out.astype(int) - cand.astype(int))[info.mask > 0.99].mean() > 0.5


def test_match_is_deterministic(aligned):
    a = match_skin_tone(aligned("003_neutral"), aligned("004_neutral"))
    b = match_skin_tone(aligned("003_neutral").copy(), aligned("004_neutral").copy())
    assert np.array_equal(a, b)


def test_match_own_tone_is_identity(aligned):
    img = aligned("001_neutral")
    out = match_skin_tone(img, img)
    assert np.abs(out.astype(int) - img.astype(int)).max() <= 1


def test_size_mismatch_is_an_error(aligned):
    small = cv2.resize(aligned("002_neutral"), (128, 128))
    with pytest.raises(KeeprError, match="same size"):
        match_skin_tone(aligned("001_neutral"), small)


def test_skin_mask_excludes_eyes_and_mouth(aligned):
    img = aligned("004_neutral")
    lm, _ = aligned_face_landmarks(img)
    region = skin_region_mask(img.shape[:2], lm)
    mask = skin_mask(img, lm)
    for idx in list(range(36, 48)) + list(range(48, 60)):
        x, y = np.round(lm[idx]).astype(int)
        assert region[y, x] == 0
    cheek = np.round(0.5 * (lm[2] + lm[31])).astype(int)  # between jaw and nose
    assert region[cheek[1], cheek[0]] == 1 and mask[cheek[1], cheek[0]] > 0.99
    assert mask.min() == 0.0 and mask.max() == 1.0
    # Feathered: there are intermediate values at the edge.
    assert ((mask > 0.05) & (mask < 0.95)).sum() > 100
    # Background is not skin-coloured grey.
    assert not plausible_skin(np.full((4, 4, 3), 200, np.uint8)).any()


# ---------------------------------------------------------------------------------------------------------------
# Hue is circular (synthetic)


def _hsv_image(hues_deg, s=0.5, v=0.7, shape=(40, 40)):
    h = np.resize(np.asarray(hues_deg, np.float32), shape[0] * shape[1]).reshape(shape)
    hsv = np.stack([h, np.full(shape, s, np.float32), np.full(shape, v, np.float32)], axis=-1)
    return hsv_to_rgb(hsv)


def test_dominant_tone_of_reds_around_zero():
    # 80% reds spread evenly over 352..8 degrees, 20% green: the dominant tone is red at ~0 degrees.
    hues = np.concatenate([np.linspace(-8.0, 8.0, 80) % 360.0, np.full(20, 120.0)])
    img = _hsv_image(hues, shape=(50, 50))
    tone = dominant_skin_tone(img, mask=np.ones(img.shape[:2], np.float32), n_clusters=2)
    assert abs(hue_difference(tone.hue, 0.0)) < 1.5  # a linear mean of the reds would say ~180
    assert tone.fraction == pytest.approx(0.8, abs=0.01)
    assert tone.saturation == pytest.approx(0.5, abs=0.01)


def test_transfer_across_zero_does_not_jump():
    img = _hsv_image([350, 355])
    mask = np.ones(img.shape[:2], np.float32)
    src = dominant_skin_tone(img, mask=mask)
    dst = SkinTone(hue=8.0, saturation=0.5, value=0.7, fraction=1.0, num_pixels=1)
    out, shift, scale = transfer_tone(img, mask, src, dst)
    assert 10.0 < shift < 25.0  # rotate forward through 0, not backwards by ~340 degrees
    hsv_in, hsv_out = rgb_to_hsv(img), rgb_to_hsv(out)
    moved = hue_difference(hsv_out[..., 0], hsv_in[..., 0])
    assert np.abs(moved - shift).max() < 1.5
    assert np.all((hsv_out[..., 0] < 30) | (hsv_out[..., 0] > 330))  # still red, never through green/blue
    assert np.abs(out.max(axis=2).astype(int) - img.max(axis=2).astype(int)).max() <= 1
    back = dominant_skin_tone(out, mask=mask)
    assert abs(hue_difference(back.hue, dst.hue)) < 1.5


def test_transfer_respects_mask():
    img = _hsv_image([20.0])
    mask = np.zeros(img.shape[:2], np.float32)
    mask[10:30, 10:30] = 1.0
    mask[10:30, 30] = 0.5
    src = SkinTone(20.0, 0.5, 0.7, 1.0, 1)
    dst = SkinTone(340.0, 0.3, 0.7, 1.0, 1)
    out, _, _ = transfer_tone(img, mask, src, dst)
    assert np.array_equal(out[mask == 0], img[mask == 0])
    hsv = rgb_to_hsv(out)
    assert abs(hue_difference(hsv[20, 20, 0], 340.0)) < 1.5 and abs(hsv[20, 20, 1] - 0.3) < 0.01
    assert abs(hue_difference(hsv[20, 30, 0], 0.0)) < 1.5  # half-way, the short way round


def test_too_few_skin_pixels_is_an_error():
    img = _hsv_image([20.0])
    with pytest.raises(KeeprError, match="skin pixels"):
        dominant_skin_tone(img, mask=np.zeros(img.shape[:2], np.float32))
