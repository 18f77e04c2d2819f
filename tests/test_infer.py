"""infer.py: bad inputs (fast) and end-to-end runs with the tiny models on real clips (slow)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from keepr.fileio import sha256_file
from tests.support.clips import gradient_video

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def call_infer(args: list[str]) -> tuple[int, str]:
    """Run infer.main in-process; returns (exit status, stderr text)."""
    import infer

    try:
        infer.main(args)
        return 0, ""
    except SystemExit as e:
        return int(e.code or 0), ""


def assert_clean_failure(capsys, out: Path, args: list[str], match: str):
    code, _ = call_infer(args)
    err = capsys.readouterr().err.strip()
    assert code == 1, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert match in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no temp dir left


# ----------------------------------------------------------------------------------------------------------------
# Bad input: each is one line on stderr, exit status 1, nothing at OUT_DIR. These fail before any model is loaded.


@pytest.fixture
def bad_args(tmp_path, media_dir):
    out = tmp_path / "out"

    def make(video, *extra):
        return out, ["--video", str(video), "--out", str(out), "--config", "configs/infer/tiny.yaml",
                     "--progress", "false", *extra]
    return make


@pytest.mark.parametrize("kind,match", [
    ("missing", "no such file"), ("empty", "empty file"), ("corrupt", "not a readable video"),
    ("text", "not a video"), ("image", "still image"),
])
def test_bad_video_files(kind, match, bad_args, tmp_path, media_dir, capsys):
    p = {"missing": tmp_path / "nope.mp4", "empty": tmp_path / "empty.mp4", "corrupt": tmp_path / "corrupt.mp4",
         "text": tmp_path / "notes.txt", "image": media_dir / "photos" / "lisa" / "lisa1.jpg"}[kind]
    if kind == "empty":
        p.write_bytes(b"")
    elif kind == "corrupt":
        p.write_bytes(np.random.default_rng(0).integers(0, 256, 30000, dtype=np.uint8).tobytes())
    elif kind == "text":
        p.write_text("not a video\n" * 40)
    out, args = bad_args(p)
    assert_clean_failure(capsys, out, args, match)


def test_candidate_out_of_range(bad_args, media_dir, capsys):
    out, args = bad_args(media_dir / "videos" / "bbaf2n.mpg", "--candidate", "9")
    assert_clean_failure(capsys, out, args, "(--candidate) 9 out of range")


def test_missing_weights_names_file_and_source(bad_args, media_dir, tmp_path, capsys):
    gen = tmp_path / "weights" / "ffhq.pkl"
    out, args = bad_args(media_dir / "videos" / "bbaf2n.mpg", "--generator", str(gen))
    assert_clean_failure(capsys, out, args, f"missing weights: {gen}")
    capsys.readouterr()
    # The official default config names the official files.
    out2 = tmp_path / "out2"
    code, _ = call_infer(["--video", str(media_dir / "videos" / "bbaf2n.mpg"), "--out", str(out2)])
    err = capsys.readouterr().err
    assert code == 1 and "weights/ffhq.pkl" in err and "nvlabs" in err.lower() and not out2.exists()


def test_unwritable_output(media_dir, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    out = blocker / "out"  # parent is a file: cannot be created (works as root too)
    code, _ = call_infer(["--video", str(media_dir / "videos" / "bbaf2n.mpg"), "--out", str(out),
                          "--config", "configs/infer/tiny.yaml"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.startswith("error: ") and len(err.splitlines()) == 1 and "not a directory" in err
    # A non-empty output directory is refused too (never overwritten).
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    code, _ = call_infer(["--video", str(media_dir / "videos" / "bbaf2n.mpg"), "--out", str(full),
                          "--config", "configs/infer/tiny.yaml"])
    assert code == 1 and "not empty" in capsys.readouterr().err and (full / "keep.txt").read_text() == "mine"


# ----------------------------------------------------------------------------------------------------------------
# End to end with the tiny models (built once per module: tiny generator + co-part model, a few pairs, a few
# encoder steps).


def _run(cmd, **kw):
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, **kw)
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return tiny_models


def decoded(path):
    from anonymizer.video import VideoReader

    return VideoReader(path)


@pytest.mark.slow
def test_end_to_end_grid_clip(tiny, media_dir, tmp_path):
    from anonymizer.video import audio_packets, count_frames, probe_video

    src = media_dir / "videos" / "bbaf2n.mpg"
    out = tmp_path / "anon"
    r = _run([PY, "infer.py", "--config", str(tiny["config"]), "--video", str(src), "--out", str(out),
              "--progress", "false"])
    assert "anonymized.mp4" in r.stdout
    assert sorted(p.name for p in out.iterdir()) == ["anonymized.mp4", "candidates.png", "latent.npy",
                                                   "report.json", "virtual_face.png"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".anon.")]

    # Size, frame rate, frame count, audio.
    i, o = probe_video(src), probe_video(out / "anonymized.mp4")
    assert (o.width, o.height, o.codec) == (i.width, i.height, "h264")
    assert o.fps == i.fps == 25
    assert count_frames(out / "anonymized.mp4") == count_frames(src) == 75
    assert audio_packets(out / "anonymized.mp4") == audio_packets(src)

    # report.json is complete and true.
    rep = json.loads((out / "report.json").read_text())
    assert rep["input"]["sha256"] == sha256_file(src) and rep["input"]["video"]["width"] == 360
    for key in ("generator", "encoder", "cosegmentation", "cosegmentation_config"):
        assert rep["models"][key]["sha256"] == sha256_file(rep["models"][key]["path"])
    assert rep["output"]["sha256"] == sha256_file(out / "anonymized.mp4") and rep["output"]["num_frames"] == 75
    assert rep["output"]["audio"] == {"mode": "copy", "codec": "mp2"}
    assert rep["settings"]["swap"]["parts"] == [1, 2, 5] and rep["settings"]["face"] == "all"
    assert len(rep["frames"]) == 75 and [f["index"] for f in rep["frames"]] == list(range(75))
    for f in rep["frames"]:
        assert {"decode", "crop", "swap", "paste", "encode"} <= set(f["timing_ms"])
        assert (f["detected"] is None) == (f["index"] % 2 == 1)  # tiny.yaml detects every 2nd frame
        (face,) = f["faces"]
        assert face["status"] in ("detected", "interpolated", "held") and len(face["crop"]) == 4
    assert rep["totals"]["frames"] == 75 and rep["totals"]["frames_anonymized"] == 75
    assert rep["totals"]["frames_passed_through"] == [] and rep["totals"]["frames_face_lost"] == []
    assert {"decode", "detect", "track", "crop", "swap", "paste", "encode"} <= set(rep["totals"]["stages"])
    assert rep["complete"] and rep["coverage"]["left"] == 0 and rep["coverage"]["face_frames"] == 75
    vf = rep["persons"]["anonymized"][0]["virtual_face"]
    assert len(vf["candidates"]) == 9 and 0 <= vf["chosen"] < 9
    latent = np.load(out / "latent.npy")
    assert latent.shape == (10, 64) and np.isfinite(latent).all()

    # Pixels away from the face are unchanged up to codec error; the face region did change.
    outside_err, inside_err = [], []
    for fa, fb, rec in zip(decoded(src), decoded(out / "anonymized.mp4"), rep["frames"]):
        x0, y0, x1, y1 = rec["faces"][0]["crop"]
        keep = np.ones(fa.image.shape[:2], bool)
        keep[max(0, int(y0) - 3):int(y1) + 4, max(0, int(x0) - 3):int(x1) + 4] = False
        diff = np.abs(fa.image.astype(int) - fb.image.astype(int)).mean(axis=2)
        outside_err.append(diff[keep].mean())
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        q = (x1 - x0) / 6
        inside_err.append(diff[int(cy - q):int(cy + q), int(cx - q):int(cx + q)].mean())
    assert max(outside_err) < 3.0, max(outside_err)
    assert np.median(inside_err) > 4 * np.median(outside_err), (np.median(inside_err), np.median(outside_err))


@pytest.mark.slow
def test_no_face_video_fails_cleanly(tiny, tmp_path, capsys):
    video = gradient_video(tmp_path / "gradient.mp4")
    out = tmp_path / "out"
    code, _ = call_infer(["--config", str(tiny["config"]), "--video", str(video), "--out", str(out),
                          "--progress", "false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("error: ") and "no face" in err[-1] and not out.exists()
    assert "use --detect.upsample" not in err[-1]  # no face of any size was seen: no advice about face size


@pytest.mark.slow
def test_candidate_choice_and_all_faces(tiny, media_dir, tmp_path):
    """--candidate picks that candidate; --face all anonymizes every track of a multi-person clip (cut short)."""
    src = media_dir / "videos" / "video_01.mp4"
    short = tmp_path / "group.mp4"
    with av.open(str(src)) as cin, av.open(str(short), "w") as cout:
        s = cout.add_stream("libx264", rate=cin.streams.video[0].average_rate)
        s.width, s.height, s.pix_fmt = 640, 480, "yuv420p"
        for k, fr in enumerate(cin.decode(video=0)):
            if k >= 10:
                break
            for p in s.encode(av.VideoFrame.from_ndarray(fr.to_ndarray(format="rgb24"), format="rgb24")):
                cout.mux(p)
        for p in s.encode(None):
            cout.mux(p)
    out = tmp_path / "all"
    code, _ = call_infer(["--config", str(tiny["config"]), "--video", str(short), "--out", str(out),
                          "--face", "all", "--candidate", "3", "--detect.upsample", "1", "--detect.every", "1",
                          "--progress", "false"])
    assert code == 0
    rep = json.loads((out / "report.json").read_text())
    tracks = rep["persons"]["anonymized"]
    assert len(tracks) >= 2 and rep["persons"]["selected"] == [t["person"] for t in tracks]
    assert all(t["virtual_face"]["chosen"] == 3 for t in tracks)
    for t in tracks:
        for f in t["virtual_face"]["files"].values():
            assert (out / f).is_file()
    assert rep["output"]["num_frames"] == 10 and all(len(f["faces"]) == len(tracks) for f in rep["frames"])


def test_choose_candidate_policy():
    from types import SimpleNamespace as C

    from anonymizer.virtual_face import choose_candidate
    from keepr.errors import KeeprError

    mk = lambda sts: [C(index=i, status=s, distance=None if s == "no face" else 0.5 + 0.1 * (s == "ok"))  # noqa: E731
                      for i, s in enumerate(sts)]
    assert choose_candidate(mk(["rejected", "no face", "ok", "ok"]), None)[0] == 2  # first passing the guard
    assert choose_candidate(mk(["rejected", "no face", "no face"]), None)[0] == 1  # else first without a face
    assert choose_candidate(mk(["rejected", "ok"]), 0) == (0, "chosen by --candidate")  # the user's choice wins
    with pytest.raises(KeeprError, match="all 2 candidates"):
        choose_candidate(mk(["rejected", "rejected"]), None)  # never silently use a look-alike
    with pytest.raises(KeeprError, match="out of range"):
        choose_candidate(mk(["ok"] * 9), 9)
