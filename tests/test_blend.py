"""Co-part crop framing and feathered paste-back in the original geometry."""
from __future__ import annotations

import numpy as np
import pytest

from anonymizer.blend import feather_mask, paste
from anonymizer.crop import CropBox, crop_aligned, crop_box, crop_frame, crop_matrix
from anonymizer.geometry import invert_affine


def test_crop_box_rule():
    b = crop_box((100, 100, 200, 180), scale=2.0, shift_y=-0.1)
    assert b.side == pytest.approx(200) and b.cx == pytest.approx(150) and b.cy == pytest.approx(140 - 8)
    with pytest.raises(ValueError):
        crop_box((10, 10, 10, 20))


def test_crop_matrix_maps_square_edges_to_crop_edges():
    m = crop_matrix(CropBox(50.0, 60.0, 40.0), 80)
    pts = np.array([[30 - 0.5, 40 - 0.5, 1], [70 - 0.5, 80 - 0.5, 1]]) @ m.T  # outer edges of the square
    assert np.allclose(pts, [[-0.5, -0.5], [79.5, 79.5]])
    assert np.allclose(invert_affine(m) @ np.array([-0.5, -0.5, 1]), [29.5, 39.5])


def test_crop_frame_integer_square_is_plain_slice():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (100, 120, 3), dtype=np.uint8)
    crop, inv = crop_frame(img, CropBox(50.0, 40.0, 32.0), 32)  # square [34,66) x [24,56), 1:1
    assert np.array_equal(crop, img[24:56, 34:66])
    # Outside the frame the border is replicated, not black.
    crop, _ = crop_frame(img, CropBox(5.0, 5.0, 20.0), 20)
    assert np.array_equal(crop[0, 0], img[0, 0])


def test_crop_frame_downscales_large_squares_without_aliasing():
    img = np.zeros((600, 600, 3), np.uint8)
    img[:, ::2] = 255  # 1-px stripes: area averaging gives ~grey, point sampling would give black/white
    crop, _ = crop_frame(img, CropBox(300.0, 300.0, 512.0), 64)
    assert 100 < crop[8:-8, 8:-8].mean() < 155 and crop[8:-8, 8:-8].std() < 20


def test_crop_aligned_matches_frame_crop(media_dir):
    from anonymizer.faces import align_face, find_face
    from keepr.images import load_image

    img = load_image(media_dir / "photos" / "london_512" / "001_neutral.jpg")
    face = find_face(img, upsample=0)
    box = crop_box(face.box, scale=1.6)
    direct, _ = crop_frame(img, box, 128)
    aligned = align_face(img, face.landmarks, size=512)
    # The crop read from the aligned image (at another resolution) shows the same pixels as the direct crop.
    via = crop_aligned(aligned.image, aligned.matrix, 512, box, 128)
    assert np.abs(via.astype(int) - direct.astype(int))[16:-16, 16:-16].mean() < 6.0


def test_feather_mask_fades_at_border():
    m = feather_mask(None, 64, border=0.1)
    assert m.dtype == np.float32 and m.shape == (64, 64)
    assert m[32, 32] == 1.0 and m[0, 32] < 0.1 and m.min() >= 0 and m.max() <= 1
    part = np.zeros((64, 64), np.float32)
    part[24:40, 24:40] = 1
    m = feather_mask(part, 64, dilate=4, blur=4)
    assert m[32, 32] > 0.9 and m[2, 2] == 0 and 0 < m[24 - 4, 32] < 1  # grown and soft around the part


def test_paste_changes_only_the_crop_footprint():
    rng = np.random.default_rng(1)
    frame = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    box = CropBox(70.3, 60.7, 50.5)
    crop, inv = crop_frame(frame, box, 64)
    swapped = np.full_like(crop, 200)
    out = paste(frame, swapped, inv, feather_mask(None, 64, border=0.1))
    x0, y0, x1, y1 = box.corners
    outside = np.ones(frame.shape[:2], bool)
    outside[int(np.floor(y0)) - 1:int(np.ceil(y1)) + 1, int(np.floor(x0)) - 1:int(np.ceil(x1)) + 1] = False
    assert np.array_equal(out[outside], frame[outside])  # bit-identical away from the crop
    assert np.abs(out[60, 70].astype(int) - 200).max() <= 1  # replaced at the centre
    assert not np.array_equal(out, frame)
    # Pasting a crop of a smooth frame back changes (almost) nothing: the geometry round-trips.
    yy, xx = np.mgrid[0:120, 0:160]
    smooth = np.stack([128 + 100 * np.sin(xx / 9.0), 128 + 100 * np.cos(yy / 7.0), (xx + yy) % 256],
                      -1).astype(np.uint8)
    crop, inv = crop_frame(smooth, box, 64)
    back = paste(smooth, crop, inv, feather_mask(None, 64, border=0.1))
    diff = np.abs(back.astype(int) - smooth.astype(int))
    assert diff[45:75, 55:85].mean() < 2.0 and np.array_equal(back[outside], smooth[outside])


def test_paste_outside_frame_is_noop():
    frame = np.zeros((50, 50, 3), np.uint8)
    out = paste(frame, np.full((16, 16, 3), 255, np.uint8), invert_affine(crop_matrix(CropBox(500.0, 500.0, 20.0), 16)),
                np.ones((16, 16), np.float32))
    assert np.array_equal(out, frame)
