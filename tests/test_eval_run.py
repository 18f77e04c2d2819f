"""`python -m eval.run` end to end on a real clip and the London photos (few frames to stay fast)."""
from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from eval.run import main
from eval.scoring import photo_identity

ROOT = Path(__file__).resolve().parents[1]


def _rows(path: Path) -> dict[tuple[str, str], dict]:
    with open(path, newline="") as f:
        return {(r["dataset"], r["method"]): r for r in csv.DictReader(f)}


def test_photo_identity_from_file_names():
    assert photo_identity(Path("g/london_512/017_neutral.jpg")) == "london_017"
    assert photo_identity(Path("g/london_512/017_smiling.jpg")) == "london_017"
    assert photo_identity(Path("g/canada_512/003f.jpg")) == "canada_512_003f"
    assert photo_identity(Path("g/lisa/lisa1.jpg")) == photo_identity(Path("g/lisa/lisa2.jpg")) == "lisa_lisa"
    assert photo_identity(Path("g/misc/astronaut_eileen_collins.png")) == "misc_astronaut_eileen_collins"


def test_baselines_on_real_clip_and_photos(media_dir, tmp_path, capsys):
    out = tmp_path / "results"
    result = main([
        "--videos", str(media_dir / "videos" / "bbaf2n.mpg"),
        "--photos", str(media_dir / "photos" / "london_512"),
        "--methods", "none,blur,mosaic,blackbox", "--out", str(out), "--max_frames", "6", "--no_progress",
    ])
    for name in ("results.csv", "results.md", "leakage_vs_realism.png", "identity_distance.png"):
        assert (out / name).is_file(), name
    for name in ("leakage_vs_realism.png", "identity_distance.png"):
        img = cv2.imread(str(out / name))
        assert img is not None and img.shape[0] > 100 and img.shape[1] > 100
    assert not list(out.glob(".*tmp"))  # no temporary leftovers

    rows = _rows(out / "results.csv")
    none, black = rows[("bbaf2n.mpg", "none")], rows[("bbaf2n.mpg", "blackbox")]
    # `none` leaks 100% (the face is the original); `blackbox` is never detected and never matched.
    assert int(none["frames"]) == 6 and float(none["match_rate@0.6"]) == 1.0
    assert float(none["identity_distance_mean"]) == 0
    assert float(none["detection_rate"]) == 1.0 and float(none["landmark_nme"]) == 0.0
    assert float(black["detection_rate"]) == 0.0 and float(black["match_rate@0.6"]) == 0.0
    assert math.isnan(float(black["landmark_nme"]))
    for m in ("blur", "mosaic"):
        r = rows[("bbaf2n.mpg", m)]
        assert 0.0 <= float(r["match_rate@0.6"]) <= 1.0 and float(r["identity_distance_mean"]) > 0
        assert float(r["warping_error"]) >= 0 and float(r["flicker"]) >= 0
    # faces left: `none` leaves the one face in all 6 frames, the others leave none.
    assert (int(none["faces_seen"]), int(none["faces_left"]), none["faces_left_frames"]) == (6, 6, "0-5")
    assert all(int(rows[("bbaf2n.mpg", m)]["faces_left"]) == 0 for m in ("blur", "mosaic", "blackbox"))
    # The photo re-identification: the original neutral photo finds its own smiling photo; a black box finds nobody.
    assert float(rows[("photos", "none")]["reid_top1"]) == 1.0 and int(rows[("photos", "none")]["reid_probes"]) == 5
    assert float(rows[("photos", "blackbox")]["photo_detection_rate"]) == 0.0
    # Aggregate rows and the FID/KID/LPIPS placeholders (no weights given).
    assert ("ALL videos", "blur") in rows
    assert rows[("ALL videos", "none")]["fid"].startswith("unavailable (no weights: pass --inception_weights PATH)")

    table = (out / "results.md").read_text()
    assert table.splitlines()[0].startswith("| method |") and "| blackbox |" in table
    assert "lpips: unavailable (no weights: pass --lpips_weights PATH)" in table
    assert result.summary["none"]["match_rate@0.6"] == 1.0
    assert "| none |" in capsys.readouterr().out


def _fails(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1
    return err


def test_cli_errors_are_one_line(tmp_path, media_dir, capsys):
    video = str(media_dir / "videos" / "bbaf2n.mpg")
    assert "pixelate" in _fails(["--videos", video, "--out", str(tmp_path / "r"), "--methods", "blur,pixelate"], capsys)
    assert "missing.mp4" in _fails(["--videos", str(tmp_path / "missing.mp4"), "--out", str(tmp_path / "r"),
                                    "--methods", "none"], capsys)
    assert not (tmp_path / "r").exists()


def test_cli_module_entry_point(tmp_path):
    """``python -m eval.run`` is wired to ``main`` (error path: no work done)."""
    r = subprocess.run([sys.executable, "-m", "eval.run", "--videos", str(tmp_path / "none.mp4"), "--out",
                        str(tmp_path / "r"), "--methods", "none"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.startswith("error:") and "none.mp4" in r.stderr


@pytest.mark.slow
def test_keepr_method_through_pipeline(tiny_models, media_dir, tmp_path):
    m = tiny_models
    out = tmp_path / "results"
    result = main([
        "--videos", str(media_dir / "videos" / "bbaf2n.mpg"), "--methods", "keepr,none", "--out", str(out),
        "--max_frames", "5", "--no_progress", "--config", str(ROOT / "configs" / "infer" / "tiny.yaml"),
        "--generator", m["generator"], "--encoder", m["encoder"], "--cosegmentation", m["cosegmentation"],
        "--cosegmentation_config", m["cosegmentation_config"],
    ])
    rows = _rows(out / "results.csv")
    keepr = rows[("bbaf2n.mpg", "keepr")]
    assert int(keepr["frames"]) == 5 and int(keepr["frames_described"]) == 5
    # The keepr frames differ from the original (something was pasted), and every metric is a measured number.
    clip = result.per_video["bbaf2n.mpg"]
    assert clip["keepr"].distances.shape == (5,) and (clip["keepr"].distances > 0).all()
    for k in ("match_rate@0.6", "identity_distance_mean", "detection_rate", "warping_error", "flicker_excess"):
        assert math.isfinite(float(keepr[k])), k


def test_keepr_missing_weights_is_clean_error(tmp_path, media_dir, capsys):
    err = _fails(["--videos", str(media_dir / "videos" / "bbaf2n.mpg"), "--methods", "keepr,none", "--out",
                  str(tmp_path / "r"), "--max_frames", "2", "--no_progress", "--generator", str(tmp_path / "nope.pkl")],
                 capsys)
    assert "nope.pkl" in err and "StyleGAN2" in err
    assert not (tmp_path / "r").exists()


def test_aggregate_weights_by_frames_and_sums_counts():
    import numpy as np

    from eval.scoring import ClipScore
    from eval.tables import aggregate

    a = ClipScore({"dataset": "a", "method": "blur", "frames": 10, "frames_described": 10, "pose_frames": 4,
                   "match_rate@0.6": 0.0, "warping_error": 1.0, "fid": "unavailable (x)"}, np.zeros(10), [])
    b = ClipScore({"dataset": "b", "method": "blur", "frames": 30, "frames_described": 28, "pose_frames": 6,
                   "match_rate@0.6": 1.0, "warping_error": float("nan"), "fid": "unavailable (x)"}, np.zeros(30), [])
    agg = aggregate({"a": {"blur": a}, "b": {"blur": b}}, ["blur", "none"])
    assert list(agg) == ["blur"]
    r = agg["blur"]
    assert r["frames"] == 40 and r["frames_described"] == 38 and r["pose_frames"] == 10
    assert r["match_rate@0.6"] == pytest.approx(0.75)  # frame-weighted
    assert r["warping_error"] == 1.0  # NaN clips are left out
    assert r["fid"] == "unavailable (x)"


def _faceless_video(path: Path, n: int = 6) -> Path:
    from tests.support.clips import gradient_video

    return gradient_video(path, n)


def test_a_faceless_clip_is_reported_and_the_evaluation_goes_on(media_dir, tmp_path, capsys):
    """Issue 12: one face-less clip in a folder must not abort the evaluation; its row names the file and cause."""
    import shutil

    clips = tmp_path / "clips"
    clips.mkdir()
    shutil.copy(media_dir / "videos" / "bbaf2n.mpg", clips / "bbaf2n.mpg")
    faceless = _faceless_video(clips / "gradient.mp4")
    out = tmp_path / "results"
    result = main(["--videos", str(clips), "--methods", "none,blur", "--out", str(out), "--max_frames", "4",
                   "--no_progress"])
    rows = _rows(out / "results.csv")
    for m in ("none", "blur"):
        err = rows[("gradient.mp4", m)]["error"]
        assert str(faceless) in err and "no face found" in err
        assert rows[("bbaf2n.mpg", m)]["error"] == ""  # the clip that works is scored as before
        assert int(rows[("bbaf2n.mpg", m)]["frames"]) == 4
    assert int(rows[("ALL videos", "none")]["frames"]) == 4  # the failed clip is left out of the aggregate
    assert float(rows[("bbaf2n.mpg", "none")]["match_rate@0.6"]) == 1.0
    table = (out / "results.md").read_text()
    assert "Failed (left out of the table):" in table and f"- gradient.mp4: {faceless}: no face found" in table
    assert "Videos: bbaf2n.mpg;" in table
    assert [(f.video, f.method) for f in result.failures] == [(faceless, None)]
    assert list(result.per_video) == ["bbaf2n.mpg"]
    assert (out / "identity_distance.png").is_file()
    err = capsys.readouterr().err
    assert f"warning: {faceless}: no face found" in err


def test_every_clip_failing_is_one_line_error_with_results_written(tmp_path, capsys):
    faceless = _faceless_video(tmp_path / "gradient.mp4")
    out = tmp_path / "results"
    with pytest.raises(SystemExit) as exc:
        main(["--videos", str(faceless), "--methods", "none", "--out", str(out), "--max_frames", "3", "--no_progress"])
    assert exc.value.code == 1
    # A warning when the clip fails, then the error: one line.
    warning, err = capsys.readouterr().err.strip().splitlines()
    assert warning == f"warning: {faceless}: no face found in any frame; going on with the others"
    assert err == (f"error: every video failed (1): {faceless}: no face found in any frame; the errors are in "
                   f"{out / 'results.csv'}")
    rows = _rows(out / "results.csv")
    assert "no face found" in rows[("gradient.mp4", "none")]["error"]
    assert "gradient.mp4" in (out / "results.md").read_text()


def test_a_failing_method_is_reported_and_the_others_go_on(media_dir, tmp_path, monkeypatch):
    import eval.scoring as run  # where the methods are applied
    from keepr.errors import KeeprError

    real = run.PixelMethod

    class Failing(real):
        def apply(self, frame, box):  # the evaluation streams: one frame at a time
            if self.name == "blur":
                raise KeeprError("blur broke")
            return super().apply(frame, box)

    monkeypatch.setattr(run, "PixelMethod", Failing)
    video = media_dir / "videos" / "bbaf2n.mpg"
    out = tmp_path / "results"
    result = main(["--videos", str(video), "--methods", "none,blur", "--out", str(out), "--max_frames", "3",
                   "--no_progress"])
    rows = _rows(out / "results.csv")
    assert rows[("bbaf2n.mpg", "blur")]["error"] == f"{video}: blur broke"
    assert int(rows[("bbaf2n.mpg", "none")]["frames"]) == 3
    assert [(f.method, f.error) for f in result.failures] == [("blur", f"{video}: blur broke")]
    assert "- bbaf2n.mpg (blur): " in result.table


@pytest.mark.slow
def test_two_processes_write_the_same_results_as_one(media_dir, tmp_path):
    """Issue 17: the videos split across 2 CPU DDP ranks, merged on rank 0: the same results.csv and results.md."""
    import os
    import shutil

    clips = tmp_path / "clips"
    clips.mkdir()
    for name in ("bbaf2n.mpg", "video_01.mp4"):
        shutil.copy(media_dir / "videos" / name, clips / name)
    _faceless_video(clips / "gradient.mp4")  # a failed video is merged too
    common = ["--videos", str(clips), "--methods", "blur,none", "--max_frames", "3", "--no_progress"]
    main([*common, "--out", str(tmp_path / "one")])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "eval.run", *common, "--out", str(tmp_path / "two"),
                        "--trainer.devices", "2", "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("results.csv", "results.md"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    assert (tmp_path / "two" / "identity_distance.png").is_file()
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    rows = _rows(tmp_path / "two" / "results.csv")
    assert "no face found" in rows[("gradient.mp4", "none")]["error"]
    assert int(rows[("ALL videos", "none")]["frames"]) == 6


@pytest.mark.slow
def test_keepr_method_tracks_the_boxes_infer_renders(tiny_models, media_dir, tmp_path):
    """Issue 13: eval's target is the pipeline's pass 1 over the whole clip (scan.persons[0]), so with --max_frames
    its boxes are the first boxes infer.py renders (report.json), not those of a tracking of the first frames."""
    import json

    import infer
    from eval.baselines import keepr_settings, track_target

    video = media_dir / "videos" / "bbaf2n.mpg"
    out = tmp_path / "infer"
    infer.main(["--config", str(tiny_models["config"]), "--video", str(video), "--out", str(out),
                "--progress", "false"])
    report = json.loads((out / "report.json").read_text())
    infer_boxes = [next((f["box"] for f in rec["faces"] if f["person"] == 0), None) for rec in report["frames"]]
    assert len(infer_boxes) > 6 and all(b is not None for b in infer_boxes[:6])

    # The keepr method's settings (--face largest), as eval.run builds them from the same flags.
    settings = keepr_settings({"config": str(tiny_models["config"])})
    boxes = track_target(video, settings, max_frames=6)
    assert [[round(v, 2) for v in b] for b in boxes] == infer_boxes[:6]
    assert [[round(v, 2) for v in b] for b in track_target(video, settings)] == infer_boxes
