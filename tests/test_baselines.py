"""Pixel baselines (none, blur, mosaic, blackbox) and the shared face tracking on a real clip."""
from __future__ import annotations

import numpy as np
import pytest

from anonymizer.fallback import blackbox_region, blur_region, expand_box, mosaic_region
from eval.baselines import PixelMethod, parse_methods, track_target
from keepr.errors import KeeprError


@pytest.fixture(scope="module")
def photo(media_dir):
    from keepr.images import load_image

    return load_image(media_dir / "photos" / "london_512" / "002_neutral.jpg")


BOX = (180, 190, 330, 340)


def _outside_unchanged(a, b, box, margin=0.2):
    x0, y0, x1, y1 = expand_box(box, a.shape[1], a.shape[0], margin)
    mask = np.ones(a.shape[:2], bool)
    mask[y0:y1, x0:x1] = False
    return np.array_equal(a[mask], b[mask])


def test_expand_box_clips_to_frame():
    assert expand_box((10, 10, 110, 60), 200, 100, 0.2) == (0, 0, 130, 70)
    assert expand_box((150, 50, 200, 100), 190, 90, 0.0) == (150, 50, 190, 90)


def test_none_is_identity(photo):
    out = PixelMethod("none").apply(photo, BOX)
    assert out is not photo and np.array_equal(out, photo)


def test_blackbox_paints_region_only(photo):
    out = blackbox_region(photo, BOX, margin=0.2)
    x0, y0, x1, y1 = expand_box(BOX, photo.shape[1], photo.shape[0], 0.2)
    assert (out[y0:y1, x0:x1] == 0).all()
    assert _outside_unchanged(photo, out, BOX)


def test_mosaic_cells_are_flat_and_average(photo):
    out = mosaic_region(photo, BOX, margin=0.0, blocks=10)
    x0, y0, x1, y1 = BOX
    region = out[y0:y1, x0:x1].astype(np.int32)
    # 150 px box / 10 blocks = 15 px cells: every cell is one colour, close to the cell's mean in the original.
    cell = region[:15, :15]
    assert (cell == cell[0, 0]).all()
    np.testing.assert_allclose(cell[0, 0], photo[y0 : y0 + 15, x0 : x0 + 15].reshape(-1, 3).mean(0), atol=1.0)
    assert len(np.unique(region.reshape(-1, 3), axis=0)) <= 100
    assert _outside_unchanged(photo, out, BOX, 0.0)


def test_blur_smooths_region_only(photo):
    out = blur_region(photo, BOX, margin=0.2)
    x0, y0, x1, y1 = BOX
    # High-frequency energy inside the face drops a lot; outside nothing changes.
    grad = lambda im: np.abs(np.diff(im[y0:y1, x0:x1].astype(np.float32), axis=1)).mean()  # noqa: E731
    assert grad(out) < 0.3 * grad(photo)
    assert _outside_unchanged(photo, out, BOX)


def test_frames_without_box_pass_through(photo):
    frames = [photo, photo]
    outs = list(PixelMethod("blackbox")(frames, [BOX, None]))
    assert not np.array_equal(outs[0], photo) and np.array_equal(outs[1], photo)


def test_parse_methods():
    assert parse_methods("keepr, blur,blur,none") == ["keepr", "blur", "none"]
    with pytest.raises(KeeprError, match="pixelate"):
        parse_methods("blur,pixelate")
    with pytest.raises(KeeprError):
        PixelMethod("pixelate")


def test_track_target_on_real_clip(media_dir):
    boxes = track_target(media_dir / "videos" / "bbaf2n.mpg", max_frames=10)
    assert len(boxes) == 10 and all(b is not None for b in boxes)
    # The whole clip is tracked first (as infer.py tracks it), then cut: the first 10 boxes of the full timeline.
    assert boxes == track_target(media_dir / "videos" / "bbaf2n.mpg")[:10]
    # One talking head, centred: boxes are stable and lie inside the frame.
    arr = np.array(boxes)
    assert (arr[:, 0] >= 0).all() and (arr[:, 2] <= 360).all() and (arr[:, 3] <= 288).all()
    assert np.abs(np.diff(arr, axis=0)).max() < 10
