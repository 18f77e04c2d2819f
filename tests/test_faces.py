"""Face loading, detection, selection, FFHQ alignment and pasting an aligned crop back, on the bundled real photos."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from anonymizer.blend import paste
from anonymizer.faces import (
    AlignedFace,
    Face,
    align_face,
    aligned_face_landmarks,
    detect_faces,
    ffhq_quad,
    find_face,
    select_faces,
)
from anonymizer.geometry import border_feather_mask, transform_points
from keepr.errors import KeeprError
from keepr.images import load_image, to_rgb_uint8

PEOPLE = [f"{i:03d}_{e}" for i in range(1, 6) for e in ("neutral", "smiling")]


@pytest.fixture(scope="module")
def photos(media_dir):
    d = media_dir / "photos"
    out = {name: load_image(d / "london_512" / f"{name}.jpg") for name in PEOPLE}
    out["lisa1"] = load_image(d / "lisa" / "lisa1.jpg")
    out["lisa2"] = load_image(d / "lisa" / "lisa2.jpg")
    out["astronaut"] = load_image(d / "misc" / "astronaut_eileen_collins.png")
    return out


@pytest.fixture(scope="module")
def detections(photos):
    return {k: detect_faces(v) for k, v in photos.items()}


# ---------------------------------------------------------------------------------------------------------------
# Images


def test_load_image_formats(tmp_path, photos):
    rgb = photos["001_neutral"]
    assert rgb.dtype == np.uint8 and rgb.shape == (512, 512, 3)
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    cv2.imwrite(str(tmp_path / "gray.png"), gray)
    g = load_image(tmp_path / "gray.png")
    assert g.shape == (512, 512, 3) and np.array_equal(g[..., 0], gray) and np.array_equal(g[..., 1], gray)
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])
    cv2.imwrite(str(tmp_path / "rgba.png"), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    assert np.array_equal(load_image(tmp_path / "rgba.png"), rgb)
    cv2.imwrite(str(tmp_path / "deep.png"), cv2.cvtColor(rgb.astype(np.uint16) * 257, cv2.COLOR_RGB2BGR))
    assert np.array_equal(load_image(tmp_path / "deep.png"), rgb)


def test_load_image_errors(tmp_path):
    with pytest.raises(KeeprError, match="not found"):
        load_image(tmp_path / "missing.jpg")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(KeeprError, match="bad.jpg"):
        load_image(bad)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(KeeprError, match="empty.png"):
        load_image(empty)


def test_to_rgb_uint8_variants():
    g = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert to_rgb_uint8(g).shape == (3, 4, 3)
    assert to_rgb_uint8(g[:, :, None]).shape == (3, 4, 3)
    f = np.full((2, 2, 3), 0.5, np.float32)
    assert np.all(to_rgb_uint8(f) == 128)
    with pytest.raises(KeeprError):
        to_rgb_uint8(np.zeros((2, 2, 5), np.uint8))
    with pytest.raises(KeeprError):
        to_rgb_uint8(np.full((2, 2, 3), np.nan))


# ---------------------------------------------------------------------------------------------------------------
# Detection and selection


def test_detect_one_face_each(detections, photos):
    for name in PEOPLE + ["lisa1", "lisa2"]:
        faces = detections[name]
        assert len(faces) == 1, name
        f = faces[0]
        h, w = photos[name].shape[:2]
        x0, y0, x1, y1 = f.box
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        assert f.landmarks.shape == (68, 2)
        # Landmarks sit in the box (with a margin for the chin) and the eyes are above the mouth.
        assert np.all(f.landmarks[:, 0] > x0 - 0.2 * f.width) and np.all(f.landmarks[:, 0] < x1 + 0.2 * f.width)
        assert f.landmarks[36:48, 1].mean() < f.landmarks[48:68, 1].mean()


def test_grayscale_and_rgba_detect_same_face(photos, detections):
    rgb = photos["003_neutral"]
    ref = detections["003_neutral"][0]
    for variant in (cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), np.dstack([rgb, np.zeros(rgb.shape[:2], np.uint8)])):
        faces = detect_faces(variant)
        assert len(faces) == 1
        assert np.abs(np.array(faces[0].box) - np.array(ref.box)).max() <= 25
        assert np.abs(faces[0].landmarks - ref.landmarks).mean() < 4.0


def test_several_faces_selection(detections):
    faces = detections["astronaut"]
    assert len(faces) == 2
    assert faces[0].area >= faces[1].area
    assert select_faces(faces)[0] is faces[0]
    assert select_faces(faces, "largest")[0] is faces[0]
    assert select_faces(faces, 1)[0] is faces[1]
    assert select_faces(faces, "all") == faces
    with pytest.raises(KeeprError, match="out of range"):
        select_faces(faces, 2)
    with pytest.raises(KeeprError, match="selection"):
        select_faces(faces, "biggest")


def test_no_face_is_clear():
    blank = np.full((240, 320, 3), 127, np.uint8)
    assert detect_faces(blank) == []
    with pytest.raises(KeeprError, match="blank.png: no face found"):
        select_faces(detect_faces(blank), source="blank.png")
    with pytest.raises(KeeprError, match="no face"):
        find_face(blank)
    with pytest.raises(KeeprError, match="unknown face detector"):
        detect_faces(blank, detector="haar")


def test_tiny_faces_need_upsampling(photos):
    # Face box ~187 px in 512 -> ~37 px at 100 px: below HOG's 80 px window, found after two upsamplings.
    small = cv2.resize(photos["002_neutral"], (100, 100), interpolation=cv2.INTER_AREA)
    assert detect_faces(small, upsample=0) == []
    found = detect_faces(small, upsample=2)
    assert len(found) == 1
    assert detect_faces(small, upsample=2, min_size=60) == []  # documented choice: drop faces below min_size


@pytest.mark.parametrize("detector", ["hog", "cnn"])
def test_degenerate_images_give_no_face(detector):
    for shape in [(1, 1, 3), (5, 3), (4, 300, 3), (30, 30, 4)]:
        assert detect_faces(np.zeros(shape, np.uint8), detector=detector, upsample=0) == []


def test_gif_first_frame(media_dir):
    img = load_image(media_dir / "videos" / "head-pose-face-detection-female.gif")
    assert img.shape == (270, 480, 3) and img.dtype == np.uint8
    assert len(detect_faces(img)) == 1


def test_large_image_max_side(photos, detections):
    big = cv2.resize(photos["005_neutral"], (1536, 1536), interpolation=cv2.INTER_CUBIC)
    faces = detect_faces(big, upsample=0, max_side=512)
    assert len(faces) == 1
    ref = detections["005_neutral"][0]
    assert np.abs(faces[0].landmarks / 3.0 - ref.landmarks).mean() < 3.0


def test_cnn_detector(photos, detections):
    faces = detect_faces(photos["001_neutral"], detector="cnn", upsample=0)
    assert len(faces) == 1
    ref = detections["001_neutral"][0]
    # Different detector boxes, same face: the landmark predictor lands on the same points.
    assert np.abs(faces[0].landmarks - ref.landmarks).mean() < 6.0


def test_video_frame(media_dir):
    av = pytest.importorskip("av")
    with av.open(str(media_dir / "videos" / "bbaf2n.mpg")) as container:
        frame = next(container.decode(video=0)).to_ndarray(format="rgb24")
    assert frame.shape == (288, 360, 3)
    faces = detect_faces(frame)
    assert len(faces) == 1
    a = align_face(frame, faces[0].landmarks, 128)
    assert a.image.shape == (128, 128, 3)


# ---------------------------------------------------------------------------------------------------------------
# Alignment


@pytest.mark.parametrize("size", [64, 256, 300])
def test_align_shapes_and_determinism(photos, detections, size):
    rgb, f = photos["001_smiling"], detections["001_smiling"][0]
    a = align_face(rgb, f.landmarks, size)
    b = align_face(rgb.copy(), f.landmarks.copy(), size)
    assert isinstance(a, AlignedFace)
    assert a.image.shape == (size, size, 3) and a.image.dtype == np.uint8
    assert np.array_equal(a.image, b.image) and np.array_equal(a.matrix, b.matrix)
    # The inverse really inverts, and the quad maps to the crop's outer corners.
    pts = np.random.default_rng(0).uniform(0, 512, (50, 2))
    assert np.abs(transform_points(transform_points(pts, a.matrix), a.inverse) - pts).max() < 1e-9
    corners = transform_points(a.quad, a.matrix)
    assert np.allclose(corners, [[-0.5, -0.5], [-0.5, size - 0.5], [size - 0.5, size - 0.5], [size - 0.5, -0.5]])


def test_align_large_image_matches_small(photos, detections):
    """A 3x larger copy of the photo (shrunk before warping, as FFHQ does) gives the same aligned crop."""
    rgb, f = photos["005_neutral"], detections["005_neutral"][0]
    big = cv2.resize(rgb, (1536, 1536), interpolation=cv2.INTER_CUBIC)
    lm_big = (f.landmarks + 0.5) * 3.0 - 0.5  # pixel-centre coordinates scale about the pixel edge
    for size in (128, 256):
        a = align_face(rgb, f.landmarks, size).image.astype(int)
        b = align_face(big, lm_big, size).image.astype(int)
        assert np.abs(a - b).mean() < 1.5


def test_alignment_is_ffhq_like(photos, detections):
    """Eyes level and at the FFHQ height, face centred."""
    for name in ("001_neutral", "004_smiling", "lisa2"):
        f = detections[name][0]
        a = align_face(photos[name], f.landmarks, 256)
        lm = transform_points(f.landmarks, a.matrix)
        eye_r, eye_l = lm[36:42].mean(0), lm[42:48].mean(0)
        assert abs(eye_r[1] - eye_l[1]) < 6.0
        assert 90 < 0.5 * (eye_r[1] + eye_l[1]) < 125
        assert abs(0.5 * (eye_r[0] + eye_l[0]) - 128) < 8


@pytest.mark.parametrize("name", ["001_neutral", "002_smiling", "003_neutral", "004_neutral", "005_smiling",
                                  "lisa1", "lisa2"])
def test_landmarks_round_trip(photos, detections, name):
    """Landmarks found again on the aligned crop, mapped back by the inverse, land on the original ones."""
    rgb, f = photos[name], detections[name][0]
    a = align_face(rgb, f.landmarks, 256)
    lm, detected = aligned_face_landmarks(a.image)
    assert detected
    back = transform_points(lm, a.inverse)
    err = np.linalg.norm(back - f.landmarks, axis=1)
    # Inner face (brows, eyes, nose, mouth): what alignment and skin masks are built from.
    assert err[17:].mean() < 2.0, err[17:].mean()
    for sl in (slice(36, 42), slice(42, 48), slice(48, 60)):
        assert np.linalg.norm(back[sl].mean(0) - f.landmarks[sl].mean(0)) < 2.0
    # Quad from the recovered landmarks is close to the original (alignment is stable).
    assert np.abs(ffhq_quad(back) - a.quad).max() < 0.05 * np.hypot(*(a.quad[3] - a.quad[0]))


def test_aligned_landmarks_without_detection(photos, detections):
    rgb, f = photos["002_neutral"], detections["002_neutral"][0]
    a = align_face(rgb, f.landmarks, 256)
    lm, detected = aligned_face_landmarks(a.image, detect=False)
    assert not detected
    assert np.linalg.norm(transform_points(lm, a.inverse) - f.landmarks, axis=1)[17:].mean() < 3.0


def test_align_face_outside_frame(photos, detections):
    # Face near the border: crop goes beyond the image; reflect and constant padding both work.
    rgb, f = photos["001_neutral"], detections["001_neutral"][0]
    shifted = np.ascontiguousarray(rgb[:, 150:])
    lm = f.landmarks - [150, 0]
    a = align_face(shifted, lm, 128, border="constant")
    assert a.image.shape == (128, 128, 3)
    assert (a.image.sum(axis=2) == 0).any()
    assert not (align_face(shifted, lm, 128).image.sum(axis=2) == 0).all()


# ---------------------------------------------------------------------------------------------------------------
# Pasting back


def test_paste_of_an_aligned_crop_reconstructs_and_keeps_outside(photos, detections):
    rgb, f = photos["003_smiling"], detections["003_smiling"][0]
    a = align_face(rgb, f.landmarks, 512)  # about the face's own scale, so little resampling loss
    out = paste(rgb, a.image, a.inverse, border_feather_mask(512, 0.05))  # the pipeline's paste, aligned crops too
    assert out.shape == rgb.shape and out.dtype == np.uint8
    x0, y0, x1, y1 = f.box
    diff = np.abs(out[y0:y1, x0:x1].astype(int) - rgb[y0:y1, x0:x1].astype(int))
    assert diff.mean() < 3.0
    # Outside the crop's footprint nothing changes.
    foot = np.zeros(rgb.shape[:2], np.uint8)
    cv2.fillConvexPoly(foot, np.round(a.quad).astype(np.int32), 1)
    foot = cv2.dilate(foot, np.ones((5, 5), np.uint8))
    assert np.array_equal(out[foot == 0], rgb[foot == 0])


def test_paste_of_an_aligned_crop_follows_the_mask(photos, detections):
    rgb, f = photos["004_neutral"], detections["004_neutral"][0]
    a = align_face(rgb, f.landmarks, 256)
    red = np.zeros_like(a.image)
    red[..., 0] = 255
    assert np.array_equal(paste(rgb, red, a.inverse, np.zeros((256, 256), np.float32)), rgb)
    mask = np.zeros((256, 256), np.float32)
    mask[96:160, 96:160] = 1.0
    out = paste(rgb, red, a.inverse, mask)
    centre = np.round(transform_points(np.array([[128.0, 128.0]]), a.inverse)[0]).astype(int)
    assert tuple(out[centre[1], centre[0]]) == (255, 0, 0)
    changed = np.any(out != rgb, axis=2)
    assert 0 < changed.sum() < 0.25 * changed.size
    m = border_feather_mask(100, 0.1)
    assert m[50, 50] == 1.0 and m[0, 50] < 0.1 and m.min() >= 0


def test_face_dataclass_fields(detections):
    f = detections["001_neutral"][0]
    assert isinstance(f, Face)
    assert isinstance(f.box, tuple) and all(isinstance(v, int) for v in f.box)
    assert isinstance(f.score, float) and f.size > 100
