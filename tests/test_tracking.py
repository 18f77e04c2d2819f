"""Face tracking: association, interpolation, hold-then-lost, smoothing, re-linking, target selection."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from anonymizer.persons import link_persons, select_persons
from anonymizer.tracking import FaceTracker, iou, smooth_boxes
from keepr.errors import KeeprError


@dataclass
class Det:
    box: tuple
    score: float = 1.0
    landmarks: np.ndarray | None = None


def box_at(cx, cy, s):
    return (cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2)


def test_iou():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)


def test_two_moving_faces_keep_their_tracks():
    tr = FaceTracker()
    for i in range(20):
        a = Det(box_at(100 + 3 * i, 100, 80))  # large face moving right
        b = Det(box_at(400 - 3 * i, 120, 40))  # small face moving left
        dets = [a, b] if i % 2 == 0 else [b, a]  # order of detections must not matter
        tr.update(i, dets)
    tracks = tr.finish()
    assert len(tracks) == 2
    big, small = tracks  # sorted by prominence
    assert len(big.detections) == len(small.detections) == 20
    assert all(abs((b[0] + b[2]) / 2 - (100 + 3 * i)) < 1e-6 for i, (b, _) in big.detections.items())
    persons = link_persons(tracks)  # no recogniser: each track is a person, in the same order
    assert [p.tracks for p in persons] == [[big], [small]]
    assert select_persons(persons, "largest") == [persons[0]]
    assert select_persons(persons, 1) == [persons[1]]
    assert select_persons(persons, "all") == persons
    with pytest.raises(KeeprError, match="out of range"):
        select_persons(persons, 2)
    with pytest.raises(KeeprError, match="no face"):
        select_persons([], "largest")


def test_skipped_frames_interpolated_long_gaps_held_then_lost():
    tr = FaceTracker(max_age=100)
    for i in range(0, 11, 2):  # detect every 2nd frame 0..10
        tr.update(i, [Det(box_at(100 + 2 * i, 100, 60))])
        if i < 10:
            tr.update(i + 1, None)
    for i in range(11, 30):  # face missed for frames 11..29
        tr.update(i, [])
    tr.update(30, [Det(box_at(120, 100, 60))])
    (track,) = tr.finish()
    tl = track.timeline(40, max_gap=4, hold=3, radius=0)
    st = [t.status for t in tl]
    assert st[:11] == ["detected", "interpolated"] * 5 + ["detected"]
    assert tl[5].box == pytest.approx(box_at(110, 100, 60))  # midpoint of frames 4 and 6
    assert st[11:14] == ["held"] * 3 and tl[12].box == tl[10].box
    assert set(st[14:27]) == {"lost"} and all(t.box is None for t in tl[14:27])
    assert st[27:30] == ["held"] * 3 and st[30] == "detected"
    assert st[31:34] == ["held"] * 3 and set(st[34:]) == {"lost"}


def test_smoothing_removes_jitter_without_lag():
    rng = np.random.default_rng(0)
    n = 60
    truth = np.array([box_at(100 + i, 100, 80) for i in range(n)])
    noisy = truth + rng.normal(0, 3, truth.shape)
    sm = smooth_boxes(noisy, radius=3)
    err_raw = np.abs(noisy - truth)[5:-5].mean()
    err_sm = np.abs(sm - truth)[5:-5].mean()
    assert err_sm < 0.6 * err_raw
    # A linear motion is reproduced exactly by a centred average (no lag).
    assert np.allclose(smooth_boxes(truth, 3)[3:-3], truth[3:-3])
    # Lost rows (NaN) stay lost and split the smoothing.
    noisy[30] = np.nan
    sm = smooth_boxes(noisy, 3)
    assert np.isnan(sm[30]).all() and not np.isnan(sm[29]).any()


def test_face_found_again_after_long_loss_is_relinked():
    tr = FaceTracker(max_age=5)
    for i in range(10):
        tr.update(i, [Det(box_at(100, 100, 60))])
    for i in range(10, 40):
        tr.update(i, [])
    for i in range(40, 50):
        tr.update(i, [Det(box_at(110, 105, 62))])
    tracks = tr.finish()
    assert len(tracks) == 1 and len(tracks[0].detections) == 20


def test_short_false_positive_dropped_and_best_frame_kept():
    tr = FaceTracker(min_detections=3)
    lm_frontal = np.zeros((68, 2))
    lm_frontal[36], lm_frontal[45], lm_frontal[30] = (40, 50), (80, 50), (60, 70)
    lm_profile = lm_frontal.copy()
    lm_profile[30] = (45, 70)
    for i in range(8):
        img = np.full((4, 4, 3), i, np.uint8)
        lm = lm_frontal if i == 5 else lm_profile
        dets = [Det(box_at(100, 100, 60), landmarks=lm)]
        if i == 3:
            dets.append(Det(box_at(300, 300, 20)))  # one-frame false positive
        tr.update(i, dets, image=img)
    (track,) = tr.finish()
    assert track.best_index == 5 and track.best_image[0, 0, 0] == 5
    assert np.array_equal(track.best_landmarks, lm_frontal)


def test_real_clip_tracks_one_face(media_dir):
    from anonymizer.faces import detect_faces
    from anonymizer.video import VideoReader

    tr = FaceTracker()
    n = 0
    for f in VideoReader(media_dir / "videos" / "bbaf2n.mpg"):
        if f.index >= 30:
            break
        tr.update(f.index, detect_faces(f.image, "hog", upsample=0) if f.index % 3 == 0 else None, image=f.image)
        n += 1
    tracks = tr.finish()
    assert len(tracks) == 1
    tl = tracks[0].timeline(n, max_gap=5, hold=5, radius=2)
    assert [t.status for t in tl[:4]] == ["detected", "interpolated", "interpolated", "detected"]
    assert all(t.box is not None for t in tl[:28])
    x0, y0, x1, y1 = tl[10].box
    assert 60 < x0 < x1 < 260 and 90 < y0 < y1 < 290  # the speaker's face, centre of a 360x288 frame
    assert tracks[0].best_image is not None and tracks[0].best_landmarks.shape == (68, 2)
