"""anonymizer.checks: every option and the output path checked before any work, one line naming the option."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from anonymizer.checks import check_device, check_out_dir, prepared_output, validate_settings
from anonymizer.pipeline import InferSettings
from keepr.errors import KeeprError


def settings(**groups) -> InferSettings:
    """InferSettings() with fields replaced: settings(swap={'batch_size': 0}, face='x')."""
    s = InferSettings()
    for k, v in groups.items():
        if isinstance(v, dict):
            setattr(s, k, dataclasses.replace(getattr(s, k), **v))
        else:
            setattr(s, k, v)
    return s


def refused(s: InferSettings) -> str:
    with pytest.raises(KeeprError) as exc:
        validate_settings(s)
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_defaults_pass():
    validate_settings(InferSettings())
    validate_settings(settings(face="all", virtual_face={"candidate": 8, "guard_threshold": None, "layers": "all"},
                               detect={"max_side": 640, "detector": "cnn"}))


@pytest.mark.parametrize("face", ["biggest", "-1", -2, True, 1.5])
def test_face(face):
    assert refused(settings(face=face)).startswith("face must be 'all', 'largest' or a person index >= 0")


def test_face_index_and_seed_and_progress():
    validate_settings(settings(face="2"))
    validate_settings(settings(face=0))
    assert "seed must be between 0 and 4294967295, got -1" in refused(settings(seed=-1))
    assert "seed must be an integer, got '3'" in refused(settings(seed="3"))
    assert "progress must be true or false" in refused(settings(progress="yes"))


@pytest.mark.parametrize("field,value,expected", [
    ("detector", "mtcnn", "detect.detector must be one of 'hog', 'cnn', got 'mtcnn'"),
    ("upsample", -1, "detect.upsample must be between 0 and 4, got -1"),
    ("upsample", 9, "detect.upsample must be between 0 and 4, got 9"),
    ("every", 0, "detect.every must be >= 1, got 0"),
    ("max_side", 10, "detect.max_side must be >= 64 (or null for full size), got 10"),
    ("min_size", -5, "detect.min_size must be >= 0, got -5"),
    ("upsample", 1.5, "detect.upsample must be an integer, got 1.5"),
])
def test_detect(field, value, expected):
    assert expected in refused(settings(detect={field: value}))


@pytest.mark.parametrize("field,value,expected", [
    ("iou_threshold", 0, "track.iou_threshold must be in (0, 1], got 0"),
    ("iou_threshold", 1.5, "track.iou_threshold must be in (0, 1], got 1.5"),
    ("max_age", -1, "track.max_age must be >= 0"),
    ("min_detections", 0, "track.min_detections must be >= 1"),
    ("max_gap", -1, "track.max_gap must be >= 0"),
    ("hold", -2, "track.hold must be >= 0"),
    ("smooth_radius", -1, "track.smooth_radius must be >= 0"),
    ("link_distance", float("nan"), "track.link_distance must be a finite number"),
    ("link_distance", -0.5, "track.link_distance must be >= 0"),
])
def test_track(field, value, expected):
    assert expected in refused(settings(track={field: value}))


def test_track_gap_covers_detection_interval():
    msg = refused(settings(detect={"every": 5}, track={"max_gap": 2}))
    assert "track.max_gap (2) must be >= detect.every - 1 (4)" in msg


@pytest.mark.parametrize("field,value,expected", [
    ("scale", -1, "crop.scale must be in [0.5, 5] (crop side / face box side, default 1.8), got -1"),
    ("scale", 0, "crop.scale must be in [0.5, 5]"),
    ("scale", 50, "crop.scale must be in [0.5, 5]"),
    ("scale", float("inf"), "crop.scale must be a finite number"),
    ("shift_y", float("nan"), "crop.shift_y must be a finite number"),
    ("shift_y", 3, "crop.shift_y must be in [-1, 1]"),
])
def test_crop(field, value, expected):
    assert expected in refused(settings(crop={field: value}))


@pytest.mark.parametrize("field,value,expected", [
    ("batch_size", 0, "swap.batch_size must be >= 1 (frames per part-swap batch), got 0"),
    ("batch_size", -3, "swap.batch_size must be >= 1"),
    ("mask_from", "target", "swap.mask_from must be one of 'driving', 'source', got 'target'"),
    ("parts", [], "swap.parts (--swap_parts) must name the co-part segments"),
    ("parts", [0, 2], "swap.parts (--swap_parts) must be segment numbers >= 1 (0 is the background)"),
    ("parts", [1, -2], "swap.parts (--swap_parts) must be segment numbers >= 1"),
    ("parts", [1, 1], "swap.parts (--swap_parts) names a segment twice"),
    ("hard", "no", "swap.hard must be true or false"),
])
def test_swap(field, value, expected):
    assert expected in refused(settings(swap={field: value}))


def test_swap_device(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    msg = refused(settings(swap={"device": "cuda"}))
    assert msg == ("swap.device 'cuda': no CUDA GPU is available (torch.cuda.is_available() is False); use cpu")
    assert "swap.device 'gpu0': not a torch device name" in refused(settings(swap={"device": "gpu0"}))
    assert "swap.device 'meta': device type 'meta' is not supported" in refused(settings(swap={"device": "meta"}))
    assert "swap.device must be a torch device name such as cpu, cuda or cuda:0, got ''" in refused(
        settings(swap={"device": ""}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert check_device("cuda:0") == "cuda:0" and check_device("cuda") == "cuda"
    assert ("swap.device 'cuda:3': there is only 1 CUDA GPU (cuda:0..cuda:0)"
            in refused(settings(swap={"device": "cuda:3"})))
    assert check_device("cpu") == "cpu"


@pytest.mark.parametrize("field,value,expected", [
    ("mask", "face", "blend.mask must be one of 'parts', 'crop', got 'face'"),
    ("dilate", -1, "blend.dilate must be >= 0"),
    ("blur", -0.1, "blend.blur must be >= 0"),
    ("border", 0.5, "blend.border must be in [0, 0.5) (fraction of the crop side), got 0.5"),
    ("border", -0.01, "blend.border must be in [0, 0.5)"),
])
def test_blend(field, value, expected):
    assert expected in refused(settings(blend={field: value}))


@pytest.mark.parametrize("fields,expected", [
    ({"num_candidates": 0}, "virtual_face.num_candidates must be >= 1, got 0"),
    ({"candidate": 9}, "virtual_face.candidate (--candidate) 9 out of range: there are 9 candidates (0..8)"),
    ({"candidate": -1}, "virtual_face.candidate (--candidate) must be >= 0, got -1"),
    ({"noise": -1.0}, "virtual_face.noise must be >= 0"),
    ({"layers": ["coarse", "fin"]}, "virtual_face.layers must be 'all' or a non-empty subset of"),
    ({"layers": []}, "virtual_face.layers must be"),
    ({"guard_threshold": 0}, "virtual_face.guard_threshold must be > 0 (or null for no guard), got 0"),
    ({"max_redraws": -1}, "virtual_face.max_redraws must be >= 0"),
    ({"skin_match": 1}, "virtual_face.skin_match must be true or false"),
])
def test_virtual_face(fields, expected):
    assert expected in refused(settings(virtual_face=fields))


def test_encode_and_models():
    assert "encode.crf must be between 0 and 51, got 60" in refused(settings(encode={"crf": 60}))
    assert "encode.preset must be one of" in refused(settings(encode={"preset": "quick"}))
    assert "encode.audio must be one of 'copy', 'aac', 'none', got 'mp3'" in refused(settings(encode={"audio": "mp3"}))
    assert "models.encoder must be a file path" in refused(settings(models={"encoder": ""}))


def test_every_problem_in_one_line():
    msg = refused(settings(swap={"batch_size": 0}, crop={"scale": -1}, detect={"detector": "x"}))
    assert msg.count("; ") == 2
    for opt in ("swap.batch_size", "crop.scale", "detect.detector"):
        assert opt in msg


def test_names_kept_in_step_with_the_modules():
    from anonymizer import checks
    from anonymizer.candidates import LAYER_GROUPS
    from anonymizer.settings import FALLBACKS
    from anonymizer.streams import AUDIO_MODES
    from anonymizer.video_writer import X264_PRESETS

    assert tuple(LAYER_GROUPS) == checks.LAYER_GROUPS
    assert tuple(AUDIO_MODES) == checks.AUDIO_MODES
    assert tuple(X264_PRESETS) == checks.X264_PRESETS
    assert tuple(FALLBACKS) == checks.FALLBACKS


# ----------------------------------------------------------------------------------------------------------------
# Output directory.


def test_check_out_dir(tmp_path):
    assert check_out_dir(tmp_path / "new" / "out") == tmp_path / "new" / "out"
    (tmp_path / "empty").mkdir()
    assert check_out_dir(tmp_path / "empty") == tmp_path / "empty"
    (tmp_path / "file").write_text("x")
    with pytest.raises(KeeprError, match="file: output exists and is not a directory"):
        check_out_dir(tmp_path / "file")
    with pytest.raises(KeeprError, match=r"file/out: cannot create the output directory \(.*file is not a directory"):
        check_out_dir(tmp_path / "file" / "out")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "a").write_text("x")
    with pytest.raises(KeeprError, match="full: output directory exists and is not empty"):
        check_out_dir(tmp_path / "full")
    assert not (tmp_path / "new").exists()  # nothing created


def test_check_out_dir_resolves_symlinks(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert check_out_dir(tmp_path / "link") == tmp_path / "real"
    (tmp_path / "dangling").symlink_to(tmp_path / "later")
    assert check_out_dir(tmp_path / "dangling") == tmp_path / "later"
    (tmp_path / "f").write_text("x")
    (tmp_path / "flink").symlink_to(tmp_path / "f")
    with pytest.raises(KeeprError, match="flink: output exists and is not a directory"):
        check_out_dir(tmp_path / "flink")


def test_check_out_dir_ignores_our_own_temporaries(tmp_path):
    from keepr.fileio import host_tag

    out = tmp_path / "out"
    out.mkdir()
    (out / f".out.keepr-{host_tag()}-999999-0-0123abcd.tmp").mkdir()  # a killed run's, inside a mount point
    (out / ".out.lock").write_text("1")
    assert check_out_dir(out) == out


def test_check_out_dir_unwritable_parent(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    # As root every directory is writable: make "ro" read-only as far as the check can tell.
    monkeypatch.setattr(os, "access", lambda p, mode: False if os.fspath(p) == str(ro) else real_access(p, mode))
    with pytest.raises(KeeprError, match=r"ro/out: cannot create the output directory \(.*ro is not writable\)"):
        check_out_dir(ro / "out")
    with pytest.raises(KeeprError, match=r"ro/a/b: cannot create the output directory \(.*ro is not writable\)"):
        check_out_dir(ro / "a" / "b")
    (ro / "out").mkdir()  # an existing empty directory in a read-only parent is written into
    assert check_out_dir(ro / "out") == ro / "out"
    monkeypatch.setattr(os, "access", lambda p, mode: False)
    with pytest.raises(KeeprError, match=r"ro/out: cannot write the output \(.*ro/out is not writable\)"):
        check_out_dir(ro / "out")


def test_prepared_output_refuses_a_concurrent_run(tmp_path):
    out = tmp_path / "out"
    code = ("import time\nfrom anonymizer.checks import prepared_output\n"
            f"with prepared_output({str(out)!r}):\n    print('ready', flush=True)\n    time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        with pytest.raises(KeeprError, match=rf"out: another KEEP:R run is writing to it \(pid {proc.pid}\)"):
            with prepared_output(out):
                pass
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    with prepared_output(out) as prep:
        assert prep.target == out and prep.removed == [] and prep.lock == tmp_path / ".out.lock"
        assert prep.lock.exists()
    assert not prep.lock.exists()


def test_prepared_output_removes_a_killed_runs_temporary(tmp_path):
    from keepr.fileio import atomic_dir, host_tag

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    stale = tmp_path / f".out.keepr-{host_tag()}-{p.pid}-0-0123abcd.tmp"
    stale.mkdir()
    (stale / "anonymized.mp4").write_bytes(b"partial")
    with prepared_output(tmp_path / "out") as prep:
        assert prep.removed == [stale] and not stale.exists()
        with atomic_dir(prep.target) as tmp:
            (tmp / "report.json").write_text("{}")
    assert sorted(q.name for q in tmp_path.iterdir()) == ["out"]
