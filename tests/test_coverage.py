"""No face left behind: persons, tracks reaching back, coverage decisions and fallback (fast), and end-to-end runs on
clips made from the bundled media with the tiny models (slow)."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from anonymizer.coverage import CoverageTally, CoverFrame, SwapRegion, cover_frame, owner_of, ranges, swap_alpha
from anonymizer.crop import crop_box, crop_matrix
from anonymizer.persons import link_persons, select_persons
from anonymizer.tracking import FaceTracker, Track, extend_track

# ----------------------------------------------------------------------------------------------------------------
# Tracks and persons.


def det(box, score=1.0):
    return SimpleNamespace(box=box, score=score, landmarks=None)


def test_one_frame_clip_keeps_its_face():
    t = FaceTracker(min_detections=2)
    t.update(0, [det((10, 10, 60, 60))])
    assert len(t.finish()) == 1  # the detector ran on one frame: one detection is all a face can have
    t = FaceTracker(min_detections=2)
    for i in range(10):
        t.update(i, [det((10, 10, 60, 60))] if i == 4 else [])
    assert t.finish() == [] and len(t.rejected) == 1  # a single hit among 10 detection frames is a false positive


def test_track_reaches_back_and_forward_over_coverage_faces():
    tr = Track(id=0)
    for i in (10, 11, 12):
        tr.add_detection(i, (100 + i, 50, 160 + i, 110), 1.0)
    faces = [[] for _ in range(20)]
    for i in range(3, 18):  # the coverage detector sees the face from frame 3 to 17, drifting 1 px a frame
        faces[i].append((100.0 + i, 50.0, 160.0 + i, 110.0, 0.5))
    faces[5].append((300.0, 50.0, 360.0, 110.0, 0.5))  # somebody else
    added = extend_track(tr, faces, claimed=set(), max_miss=1)
    assert added == 12 and tr.first_index == 3 and tr.last_index == 17
    assert 5 in tr.detections and tr.detections[5][0][0] == 105.0  # the overlapping box, not the other face


def _track(tid, frames, box, quality=1.0):
    tr = Track(id=tid)
    for i in frames:
        tr.add_detection(i, box, 1.0)
    tr.best_quality = quality
    return tr


class FakeRecognizer:
    """Descriptors keyed by the best box's x0: people are told apart by where their best frame was."""

    def __init__(self, by_x0):
        self.by_x0 = by_x0

    def descriptor(self, image, face):
        return np.asarray(self.by_x0[face.box[0]], dtype=np.float64)


def _with_image(tr):
    tr.best_image = np.zeros((8, 8, 3), np.uint8)
    tr.best_landmarks = np.zeros((68, 2))
    tr.best_box = tr.detections[min(tr.detections)][0]
    return tr


def test_tracks_of_one_person_are_linked_across_a_cut():
    a = _with_image(_track(0, range(0, 75), (0, 0, 100, 100)))
    b = _with_image(_track(1, range(75, 150), (360, 0, 460, 100)))  # same person after a cut, elsewhere
    c = _with_image(_track(2, range(0, 150), (200, 0, 260, 60)))  # another person, on screen all the time
    d = _with_image(_track(3, range(20, 40), (500, 0, 560, 60)))  # looks like a, but overlaps a in time
    rec = FakeRecognizer({0: [0.0] * 128, 360: [0.02] * 128, 200: [1.0] * 128, 500: [-0.01] * 128})
    persons = link_persons([a, b, c, d], rec, threshold=0.6)
    groups = sorted(sorted(p.track_ids) for p in persons)
    assert groups == [[0, 1], [2], [3]]
    one = next(p for p in persons if sorted(p.track_ids) == [0, 1])
    assert one.first_index == 0 and one.last_index == 149
    assert select_persons(persons, "largest") == [persons[0]] and persons[0] is one  # largest = largest person
    # Without identity linking the cut splits the person in two.
    assert len(link_persons([a, b, c, d], rec, threshold=None)) == 4


def test_person_timeline_never_interpolates_across_a_cut():
    a = _with_image(_track(0, range(0, 10), (0, 0, 100, 100)))
    b = _with_image(_track(1, range(11, 20), (360, 0, 460, 100)))  # frame 10 undetected, at the cut
    rec = FakeRecognizer({0: [0.0] * 128, 360: [0.0] * 128})
    (p,) = link_persons([a, b], rec)
    line = p.timeline(20, max_gap=10, hold=5, radius=2)
    assert line[9].box[0] < 50 and line[11].box[0] > 300  # smoothing stays on each side of the cut
    assert line[10].status == "held" and line[10].box[0] in (0.0, 360.0)  # never half way across the frame


# ----------------------------------------------------------------------------------------------------------------
# Coverage decisions.


def _region(face_box, size=64, mask_value=1.0, pid=0):
    cb = crop_box(face_box, 1.8, -0.1)
    return SwapRegion(pid, crop_matrix(cb, size), np.full((size, size), mask_value, np.float32))


def _ctx(**kw):
    base = dict(chosen={0}, every_person=True, descriptors={}, fallback="blur", min_alpha=0.5, margin=0.2,
                identity=False, threshold=0.6)
    base.update(kw)
    return CoverFrame(**base)


def test_swap_alpha_and_owner():
    box = (100.0, 100.0, 160.0, 160.0)
    assert swap_alpha(_region(box), box) == pytest.approx(1.0)
    assert swap_alpha(_region(box, mask_value=0.2), box) == pytest.approx(0.2)
    assert swap_alpha(_region((400.0, 100.0, 460.0, 160.0)), box) == 0.0  # the swap was elsewhere
    assert owner_of(box, {0: (400, 100, 460, 160), 1: (102, 98, 161, 158)}) == 1
    assert owner_of(box, {0: (400, 100, 460, 160)}) is None


def test_cover_frame_swap_fallback_left_kept():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 255, (240, 640, 3), dtype=np.uint8)
    f0, f1, f2 = (100.0, 50.0, 160.0, 110.0), (300.0, 50.0, 360.0, 110.0), (500.0, 50.0, 560.0, 110.0)
    faces = [(*f0, 1.0), (*f1, 1.0), (*f2, 1.0)]
    boxes = {0: f0, 1: f1}  # persons 0 and 1 are tracked here; the third face is nobody's
    # Person 0 swapped and covered; person 1 chosen but not swapped (no virtual face); the third face unknown.
    out = frame.copy()
    res = cover_frame(_ctx(chosen={0, 1}, failed={1: "guard"}), frame, out, faces, boxes, [_region(f0)])
    assert [r["result"] for r in res] == ["swap", "fallback", "fallback"]
    assert "no virtual face" in res[1]["reason"] and res[2]["reason"] == "face in no track"
    changed = np.any(out != frame, axis=2)
    assert not changed[:, :280].any() and changed[60:100, 310:350].all() and changed[60:100, 510:550].all()
    # --fallback none: the same faces are left and say why; nothing is changed.
    out = frame.copy()
    res = cover_frame(_ctx(chosen={0, 1}, fallback="none"), frame, out, faces, boxes, [_region(f0, mask_value=0.1)])
    assert [r["result"] for r in res] == ["left", "left", "left"] and (out == frame).all()
    assert res[0]["reason"] == "the swap's mask does not cover the face; --fallback none"
    # --face largest: person 1 and the unknown face are kept, not blurred.
    out = frame.copy()
    res = cover_frame(_ctx(chosen={0}, every_person=False), frame, out, faces, boxes, [_region(f0)])
    assert [r["result"] for r in res] == ["swap", "kept", "kept"] and (out == frame).all()


def test_tally_adds_up_and_lists_what_was_left():
    persons = [SimpleNamespace(id=0), SimpleNamespace(id=1)]
    ctx = _ctx(chosen={0}, every_person=False, fallback="none")
    tally = CoverageTally(persons, {0}, {"detector": "hog", "upsample": 1}, ctx)
    for i in range(10):
        res = [{"person": 0, "result": "swap" if i < 6 else "left", "reason": None if i < 6 else "r; --fallback none"},
               {"person": 1, "result": "kept", "reason": "person not chosen (--face)"}]
        tally.add(i, res)
    tally.add(10, [])
    s = tally.summary()
    assert (s["face_frames"], s["anonymized"], s["by_swap"], s["left"], s["kept"]) == (20, 6, 6, 4, 10)
    assert not s["complete"] and s["frames_with_faces"] == 10 and s["frames_with_faces_left"] == [[6, 9]]
    p0, p1 = s["persons"]
    assert p0["frames_present"] == 10 and p0["frames_swapped"] == 6 and p0["left"] == [
        {"frames": [[6, 9]], "reason": "r; --fallback none"}]
    assert p1["chosen"] is False and p1["kept"] == [[0, 9]]
    assert {"person": 1, "frames": [[0, 9]], "reason": "not chosen (--face)"} in s["not_anonymized"]
    assert ranges([3, 1, 2, 7, 9, 8]) == [[1, 3], [7, 9]]


# ----------------------------------------------------------------------------------------------------------------
# End to end with the tiny models (the swap itself is not the point: which frames are covered is).

ROOT = Path(__file__).resolve().parents[1]


def infer(tiny, video, out, *extra) -> tuple[int, dict | None, str]:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "infer.py", "--config", str(tiny["config"]), "--video", str(video),
                        "--out", str(out), "--progress", "false", *extra], cwd=ROOT, capture_output=True, text=True)
    rep = json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else None
    return r.returncode, rep, r.stdout + r.stderr


def covered_everywhere(rep) -> None:
    """Every face the coverage pass found in every frame was anonymized (swap or fallback)."""
    for f in rep["frames"]:
        assert len(f["coverage"]) == f["faces_seen"] + sum(1 for c in f["coverage"] if c.get("inferred"))
        for c in f["coverage"]:
            assert c["result"] in ("swap", "fallback"), (f["index"], c)
    assert rep["coverage"]["left"] == 0 and rep["complete"]


@pytest.mark.slow
def test_hard_cut_is_one_person_anonymized_in_every_frame(tiny_models, media_dir, tmp_path):
    from tests.support.clips import hard_cut

    clip = hard_cut(media_dir / "videos" / "bbaf2n.mpg", tmp_path / "cut.mp4")
    code, rep, log = infer(tiny_models, clip, tmp_path / "out", "--face", "largest",
                           "--coverage.identity_every", "25")
    assert code == 0, log
    assert rep["persons"]["found"] == 1 and len(rep["persons"]["anonymized"]) == 1
    assert rep["persons"]["anonymized"][0]["tracks"] == [0, 1]  # two tracks (the cut), one person, one virtual face
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "anonymized.mp4", "candidates.png", "latent.npy", "report.json", "virtual_face.png"]
    # Hand label: one face in each of the 150 frames. The coverage pass finds it in all of them.
    cov = rep["coverage"]
    assert cov["face_frames"] == 150 and cov["anonymized"] == 150 and cov["persons"][0]["frames_present"] == 150
    covered_everywhere(rep)
    assert all(len(f["faces"]) == 1 and f["faces"][0]["box"] is not None for f in rep["frames"])
    assert rep["totals"]["frames_anonymized"] == 150 and rep["totals"]["frames_passed_through"] == []
    assert "coverage: 150/150 chosen face(s) anonymized" in log


@pytest.mark.slow
def test_group_clip_every_face_covered_or_listed(tiny_models, media_dir, tmp_path):
    from tests.support.clips import first_frames

    clip = first_frames(media_dir / "videos" / "video_01.mp4", tmp_path / "group.mp4", 12)
    code, rep, log = infer(tiny_models, clip, tmp_path / "all", "--detect.upsample", "1", "--detect.every", "1",
                           "--coverage.identity", "false")
    assert code == 0, log
    assert rep["settings"]["face"] == "all" and rep["detector"]["coverage"]["upsample"] == 2
    covered_everywhere(rep)
    seen = sum(f["faces_seen"] for f in rep["frames"])
    assert seen >= 2 * 12 and rep["coverage"]["face_frames"] >= seen
    # The same clip, only the largest person chosen: the others are kept, each listed with frames and the reason.
    code, rep, log = infer(tiny_models, clip, tmp_path / "largest", "--detect.upsample", "1", "--detect.every", "1",
                           "--coverage.identity", "false", "--face", "largest")
    assert code == 0, log
    cov = rep["coverage"]
    assert cov["kept"] > 0 and cov["left"] == 0
    kept = [c for f in rep["frames"] for c in f["coverage"] if c["result"] == "kept"]
    assert len(kept) == cov["kept"] and all(c["person"] != 0 for c in kept)
    assert {e["reason"] for e in cov["not_anonymized"]} == {"not chosen (--face)"}


@pytest.mark.slow
def test_three_people_covered_from_the_first_frame(tiny_models, media_dir, tmp_path):
    clip = media_dir / "videos" / "face-demographics-first12.mp4"
    code, rep, log = infer(tiny_models, clip, tmp_path / "out", "--detect.upsample", "1",
                           "--coverage.identity_every", "4")
    assert code == 0, log
    covered_everywhere(rep)
    # Hand label (ATTRIBUTION.md): three faces in each of the 12 frames. Each is anonymized in every frame, from the
    # first frame on, by detection or by following a face between its detections.
    for f in rep["frames"]:
        assert len(f["coverage"]) == 3, (f["index"], f["coverage"])
    assert rep["coverage"]["face_frames"] == 36 and rep["coverage"]["anonymized"] == 36


@pytest.mark.slow
def test_one_frame_clip_and_phone_clip(tiny_models, media_dir, tmp_path):
    from anonymizer.video import VideoReader, probe_video
    from tests.support.clips import first_frames, frames_of, portrait_sideways

    one = first_frames(media_dir / "videos" / "bbaf2n.mpg", tmp_path / "one.mp4", 1)
    code, rep, log = infer(tiny_models, one, tmp_path / "one")
    assert code == 0, log
    assert rep["output"]["num_frames"] == 1 and rep["coverage"]["anonymized"] == 1 and rep["complete"]

    phone = portrait_sideways(media_dir / "videos" / "bbaf2n.mpg", tmp_path / "phone.mp4", 90, n=10)
    assert probe_video(phone).rotation == 90
    code, rep, log = infer(tiny_models, phone, tmp_path / "phone", "--coverage.identity", "false")
    assert code == 0, log
    assert rep["input"]["rotation"] == 90 and rep["coverage"]["anonymized"] == 10 and rep["complete"]
    out = probe_video(tmp_path / "phone" / "anonymized.mp4")
    src = probe_video(phone)
    assert (out.width, out.height) == (src.width, src.height) and out.width < out.height and out.rotation == 0
    # It plays like the input: outside the face, the displayed output equals the displayed input.
    upright = frames_of(phone)
    for a, b, f in zip(upright, (fr.image for fr in VideoReader(tmp_path / "phone" / "anonymized.mp4")),
                       rep["frames"]):
        x0, y0, x1, y1 = f["faces"][0]["crop"]
        keep = np.ones(a.shape[:2], bool)
        keep[max(0, int(y0)):int(y1) + 2, max(0, int(x0)):int(x1) + 2] = False
        assert np.abs(a.astype(int) - b.astype(int))[keep].mean() < 3.0


@pytest.mark.slow
def test_strict_fails_when_a_chosen_face_is_left(tiny_models, media_dir, tmp_path):
    from tests.support.clips import first_frames

    clip = first_frames(media_dir / "videos" / "bbaf2n.mpg", tmp_path / "short.mp4", 6)
    # The tiny co-part model's part mask covers little of the face: without a fallback the face is left.
    code, rep, log = infer(tiny_models, clip, tmp_path / "strict", "--fallback", "none", "--strict", "true",
                           "--coverage.identity", "false")
    assert code == 2, log
    assert (tmp_path / "strict" / "anonymized.mp4").is_file() and rep["complete"] is False
    assert rep["coverage"]["left"] == 6 and "6 chosen face(s) left as they were" in rep["incomplete"][0]
    assert log.strip().splitlines()[-1].startswith("error: --strict: 6 chosen face(s) left")
    assert "warning: 6 chosen face(s) left as they were in frame(s) 0-5" in log
    # Without --strict the same run succeeds, warns and marks the report.
    code, rep, log = infer(tiny_models, clip, tmp_path / "lenient", "--fallback", "none",
                           "--coverage.identity", "false")
    assert code == 0 and rep["complete"] is False and "warning: 6 chosen face(s) left" in log


@pytest.mark.slow
def test_no_face_advice_only_when_it_applies(tiny_models, media_dir, tmp_path):
    # Tracking at upsample 0 misses these ~45 px faces; the coverage detector (upsample 1) sees them: say so.
    clip = media_dir / "videos" / "face-demographics-first12.mp4"
    code, rep, log = infer(tiny_models, clip, tmp_path / "out")
    assert code == 1 and rep is None and not (tmp_path / "out").exists()
    assert "use --detect.upsample 1" in log.strip().splitlines()[-1]
