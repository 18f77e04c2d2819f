"""Metrics on real photos (London set) and on synthetic cases with known answers."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from eval import metrics as M
from eval import temporal as T
from eval.baselines import PixelMethod

IDS = ("001", "002", "003", "004", "005")


@pytest.fixture(scope="module")
def london(media_dir):
    from keepr.images import load_image

    root = media_dir / "photos" / "london_512"
    return {(i, e): load_image(root / f"{i}_{e}.jpg") for i in IDS for e in ("neutral", "smiling")}


@pytest.fixture(scope="module")
def measurer():
    return M.FaceMeasurer(upsample=1)


@pytest.fixture(scope="module")
def measured(london, measurer):
    return {k: measurer.measure(img) for k, img in london.items()}


def test_descriptor_equals_dlib_own_computation(london, measured):
    """The measured descriptor is exactly what dlib computes from its own detector + 68-point predictor."""
    import dlib

    from anonymizer.faces import model_path

    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(model_path("landmarks68"))
    model = dlib.face_recognition_model_v1(model_path("recognition"))
    for key in [("001", "neutral"), ("001", "smiling"), ("004", "neutral")]:
        img = london[key]
        rects = detector(img, 1)
        assert len(rects) == 1
        shape = predictor(img, rects[0])
        ref = np.array(model.compute_face_descriptor(img, shape))
        m = measured[key]
        assert m.detected and not m.located
        np.testing.assert_allclose(m.descriptor, ref, rtol=0, atol=1e-6)
        ref_lm = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)
        np.testing.assert_array_equal(m.landmarks, ref_lm)
    # And the distance between two of them is dlib's Euclidean distance.
    a, b = measured[("001", "neutral")].descriptor, measured[("001", "smiling")].descriptor
    assert M.descriptor_distances(a[None], b[None])[0] == pytest.approx(float(np.linalg.norm(a - b)), abs=1e-12)


def test_same_person_matched_different_people_not(measured):
    for i in IDS:
        d = np.linalg.norm(measured[(i, "neutral")].descriptor - measured[(i, "smiling")].descriptor)
        assert d < M.SAME_PERSON_THRESHOLD, f"{i}: neutral vs smiling distance {d:.3f}"
    for i in IDS:
        for j in IDS:
            if i < j:
                d = np.linalg.norm(measured[(i, "neutral")].descriptor - measured[(j, "neutral")].descriptor)
                assert d >= M.SAME_PERSON_THRESHOLD, f"{i} vs {j}: distance {d:.3f}"


def test_identity_leakage_none_and_other_person(measured):
    orig = np.stack([measured[(i, "neutral")].descriptor for i in IDS])
    same = np.stack([measured[(i, "smiling")].descriptor for i in IDS])
    other = np.roll(orig, 1, axis=0)  # someone else's face in place of each person

    m = M.IdentityLeakage()
    m.update(orig, orig)  # 'none': the anonymized face is the original
    r = m.compute()
    assert r["frames"] == 5 and r["identity_distance_mean"] == 0.0
    assert r["match_rate@0.6"] == 1.0 and r["match_rate@0.5"] == 1.0

    m = M.IdentityLeakage()
    m.update(orig, same)
    assert m.compute()["match_rate@0.6"] == 1.0

    m = M.IdentityLeakage()
    m.update(orig, other)
    assert m.compute()["match_rate@0.6"] == 0.0

    # A frame whose anonymized face cannot be described does not leak but is counted.
    missing = orig.copy()
    missing[2] = np.nan
    m = M.IdentityLeakage()
    m.update(orig, missing)
    r = m.compute()
    assert r["frames"] == 5 and r["frames_described"] == 4 and r["match_rate@0.6"] == pytest.approx(0.8)


def test_reidentification_top1(measured):
    gallery = np.stack([measured[(i, "smiling")].descriptor for i in IDS])
    reid = M.ReIdentification(gallery, [f"london_{i}" for i in IDS])
    probes = np.stack([measured[(i, "neutral")].descriptor for i in IDS])
    reid.update(probes, [f"london_{i}" for i in IDS])
    r = reid.compute()
    assert r["reid_probes"] == 5 and r["reid_top1"] == 1.0 and r["reid_top1_within@0.6"] == 1.0
    # Probes that are someone else are never their claimed identity's nearest neighbour.
    reid.reset()
    reid.update(np.roll(probes, 1, axis=0), [f"london_{i}" for i in IDS])
    assert reid.compute()["reid_top1"] == 0.0
    with pytest.raises(ValueError):
        reid.update(probes[:1], ["nobody"])


def test_blackbox_yields_no_detection_and_none_leaks(london, measurer, measured):
    det = M.DetectionRate()
    leak_none, leak_black = M.IdentityLeakage(), M.IdentityLeakage()
    for i in ("001", "003"):
        img = london[(i, "neutral")]
        ref = measured[(i, "neutral")]
        black = PixelMethod("blackbox").apply(img, ref.box)
        m = measurer.measure(black, ref.box)
        det.update([m.detected])
        assert not m.detected and np.isnan(m.landmarks).all()
        leak_black.update(ref.descriptor[None], m.descriptor[None])
        same = measurer.measure(PixelMethod("none").apply(img, ref.box), ref.box)
        leak_none.update(ref.descriptor[None], same.descriptor[None])
    assert det.compute()["detection_rate"] == 0.0
    assert leak_none.compute()["match_rate@0.6"] == 1.0
    assert leak_black.compute()["match_rate@0.6"] == 0.0


def test_frechet_distance_known_values():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 4))
    assert M.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = np.array([1.0, 2.0, 0.0, 0.0])
    # Same covariance, shifted mean: the distance is |shift|^2.
    assert M.frechet_distance(a, a + shift) == pytest.approx(5.0, abs=1e-6)
    # Isotropic scale s on a unit Gaussian (population): d * (1 - s)^2; sample estimate close to it.
    b = rng.normal(size=(4000, 4))
    assert M.frechet_distance(b, 2 * b) == pytest.approx(4.0, rel=0.1)
    assert math.isnan(M.frechet_distance(a[:1], a))
    fd = M.DescriptorFrechetDistance()
    x = rng.normal(size=(50, 128))
    fd.update(x, x)
    assert fd.compute()["descriptor_frechet"] == pytest.approx(0.0, abs=1e-5)


def _project(yaw_deg, pitch_deg, roll_deg, size=(480, 640)):
    """68 landmarks (only the 6 model points meaningful) of the generic face rotated by the given angles."""
    y, p, r = (math.radians(v) for v in (yaw_deg, pitch_deg, roll_deg))
    ry = np.array([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
    rx = np.array([[1, 0, 0], [0, math.cos(p), -math.sin(p)], [0, math.sin(p), math.cos(p)]])
    rz = np.array([[math.cos(r), -math.sin(r), 0], [math.sin(r), math.cos(r), 0], [0, 0, 1]])
    rot = np.diag([1.0, -1.0, -1.0]) @ rz @ ry @ rx
    h, w = size
    cam = np.array([[w, 0, w / 2], [0, w, h / 2], [0, 0, 1]], dtype=np.float64)
    pts, _ = cv2.projectPoints(M.GENERIC_FACE_3D, cv2.Rodrigues(rot)[0], np.array([0.0, 0.0, 3000.0]), cam, np.zeros(4))
    lm = np.zeros((68, 2))
    lm[list(M.GENERIC_FACE_LANDMARKS)] = pts.reshape(-1, 2)
    return lm


@pytest.mark.parametrize("angles", [(0, 0, 0), (25, 0, 0), (-30, 0, 0), (0, 15, 0), (0, 0, 20), (20, -10, 5)])
def test_head_pose_recovers_known_rotation(angles):
    est = M.head_pose(_project(*angles), (480, 640))
    np.testing.assert_allclose(est, angles, atol=0.5)


def test_landmark_pose_error_on_real_photo(measured):
    lm = measured[("002", "neutral")].landmarks
    m = M.LandmarkPoseError()
    m.update(lm[None], lm[None], (512, 512))
    r = m.compute()
    assert r["landmark_nme"] == 0.0 and r["yaw_error_deg"] == 0.0 and r["pose_frames"] == 1
    # Neutral vs smiling of the same person: the expression moves the mouth, not the whole face.
    m.update(lm[None], measured[("002", "smiling")].landmarks[None], (512, 512))
    r = m.compute()
    assert 0.0 < r["landmark_nme"] < 0.2
    m.reset()
    m.update(lm[None], np.full((1, 68, 2), np.nan), (512, 512))
    r = m.compute()
    assert math.isnan(r["landmark_nme"]) and r["pose_frames"] == 0


def _textured(h=120, w=160, seed=0):
    rng = np.random.default_rng(seed)
    base = cv2.GaussianBlur(rng.uniform(0, 255, size=(h, w, 3)).astype(np.float32), (0, 0), 3)
    return np.clip((base - base.min()) / (base.max() - base.min()) * 255, 0, 255).astype(np.uint8)


def test_warping_error_and_flicker_synthetic():
    big = _textured(160, 220)
    frames = [np.ascontiguousarray(big[20:140, 20 + 2 * t : 180 + 2 * t]) for t in range(6)]  # pans 2 px per frame
    boxes = [(50, 30, 110, 90)] * len(frames)
    stable = T.warping_error(frames, frames, boxes)
    assert stable.shape == (5,) and np.all(stable < 3.0)
    rng = np.random.default_rng(1)
    noisy = [np.clip(f.astype(int) + rng.integers(-40, 41, size=f.shape), 0, 255).astype(np.uint8) for f in frames]
    assert np.nanmean(T.warping_error(frames, noisy, boxes)) > 5 * np.nanmean(stable)
    # No box: no measurement.
    assert np.isnan(T.warping_error(frames, frames, [None] * len(frames))).all()

    flat = [np.full((40, 40, 3), 100 + 10 * (t % 2), np.uint8) for t in range(5)]
    b = T.face_brightness(flat, [(0, 0, 40, 40)] * 5)
    np.testing.assert_allclose(b, [100, 110, 100, 110, 100], atol=1e-3)
    r = T.brightness_flicker(b, np.full(5, 100.0))
    assert r["flicker"] == pytest.approx(10.0, abs=1e-3) and r["flicker_excess"] == pytest.approx(10.0, abs=1e-3)
    assert T.brightness_flicker(b, b)["flicker_excess"] == 0.0
    assert T.identity_spread(np.array([0.7, 0.7, np.nan])) == 0.0


def test_image_quality_unavailable_without_weights():
    from eval.backbones import UNAVAILABLE_INCEPTION, UNAVAILABLE_LPIPS, ImageQuality

    q = ImageQuality()
    assert not q.needs_crops
    crops = np.zeros((2, 32, 32, 3), np.uint8)
    q.update(crops, crops)
    r = q.compute()
    assert r == {"fid": UNAVAILABLE_INCEPTION, "kid": UNAVAILABLE_INCEPTION, "lpips": UNAVAILABLE_LPIPS}
    assert "--inception_weights" in r["fid"] and "--lpips_weights" in r["lpips"]


def test_image_quality_missing_weights_file(tmp_path):
    from eval.backbones import ImageQuality
    from keepr.errors import MissingWeightsError

    with pytest.raises(MissingWeightsError, match="inception"):
        ImageQuality(inception_weights=str(tmp_path / "inception.pth"))


def test_fid_kid_from_features_known_values():
    import torch

    from eval.backbones import fid_from_features, kid_from_features

    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 8, generator=g, dtype=torch.float64)
    shift = torch.zeros(8, dtype=torch.float64)
    shift[:2] = torch.tensor([1.0, 2.0])
    assert fid_from_features(a, a) == pytest.approx(0.0, abs=1e-4)
    assert fid_from_features(a, a + shift) == pytest.approx(5.0, abs=1e-3)
    expected = M.frechet_distance(a.numpy(), (a + shift).numpy())
    assert fid_from_features(a, a + shift) == pytest.approx(expected, abs=1e-3)
    # KID is an unbiased estimate: about zero for the same distribution, clearly positive for a shifted one.
    shifted = kid_from_features(a, a + shift, subset_size=150)
    assert shifted > 1.0 and abs(kid_from_features(a, a, subset_size=150)) < 0.05 * shifted


@pytest.mark.slow
def test_image_quality_with_user_weights(tmp_path, london):
    """With (here randomly initialised) backbone weights from a file, FID/KID/LPIPS are computed; bad files refused."""
    import torch
    from torchvision.models import alexnet, inception_v3

    from eval.backbones import ImageQuality, InceptionFeatures
    from keepr.errors import KeeprError

    torch.manual_seed(0)
    inc = tmp_path / "inception.pth"
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), inc)
    alex = tmp_path / "alexnet.pth"
    torch.save(alexnet(weights=None).state_dict(), alex)
    with pytest.raises(KeeprError, match="not torchvision Inception-v3"):
        InceptionFeatures(str(alex))

    crops = np.stack([cv2.resize(london[(i, "neutral")], (64, 64), interpolation=cv2.INTER_AREA) for i in IDS[:2]])
    black = crops.copy()
    black[:, 16:48, 16:48] = 0
    q = ImageQuality(inception_weights=str(inc), lpips_weights=str(alex), kid_subset_size=2)
    q.update(crops, black)
    r = q.compute()
    assert q.count == 2 and r["lpips"] > 0.01
    assert all(isinstance(r[k], float) and np.isfinite(r[k]) for k in ("fid", "kid", "lpips"))
    assert torch.cat(q._real).shape == (2, 2048)
    # LPIPS of identical crops is zero.
    q = ImageQuality(lpips_weights=str(alex))
    q.update(crops, crops)
    assert q.compute()["lpips"] == pytest.approx(0.0, abs=1e-6)
