"""infer.py on the inputs of the reliability issue: options refused up front naming the option, a concurrent run
refused, and (slow) MJPEG + PCM in AVI, several audio and subtitle streams, a truncated file, a symlinked output."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str]) -> tuple[int, str]:
    r = subprocess.run([sys.executable, "infer.py", *args], cwd=ROOT, capture_output=True, text=True)
    return r.returncode, r.stderr


@pytest.mark.parametrize("flag,value,names", [
    ("--encode.preset", "bogus", "encode.preset"),
    ("--encode.crf", "77", "encode.crf"),
    ("--swap.device", "cuda:7", "swap.device"),
    ("--swap.batch_size", "0", "swap.batch_size"),
    ("--crop.scale", "-1", "crop.scale"),
    ("--fallback", "pixelate", "fallback"),
    ("--coverage.upsample", "0", "coverage.upsample"),
    ("--swap.precision", "16", "swap.precision"),  # float16 on a CPU
])
def test_bad_options_refused_before_any_work(flag, value, names, media_dir, tmp_path):
    out = tmp_path / "out"
    code, err = run(["--video", str(media_dir / "videos" / "bbaf2n.mpg"), "--out", str(out), "--config",
                     "configs/infer/tiny.yaml", "--detect.upsample", "1", flag, value, "--generator",
                     str(tmp_path / "missing.pkl")])  # the missing model is not reached: options come first
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: ") and names in lines[0], err
    assert "missing weights" not in lines[0] and "audio" not in lines[0]
    assert not out.exists() and os.listdir(tmp_path) == []


def test_second_run_into_the_same_output_is_refused(media_dir, tmp_path):
    from keepr.fileio import output_lock

    out = tmp_path / "out"
    with output_lock(out):  # another run holds the output
        code, err = run(["--video", str(media_dir / "videos" / "bbaf2n.mpg"), "--out", str(out), "--config",
                         "configs/infer/tiny.yaml"])
    assert code == 1 and "another KEEP:R run is writing to it" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------------------
# Slow: with the tiny models on short clips made from the bundled GRID clip.


def grid_frames(media_dir, n=8):
    from tests.support.clips import frames_of

    return frames_of(media_dir / "videos" / "bbaf2n.mpg", n)


def write(path, frames, vcodec="libx264", pix_fmt="yuv420p", audio=(), subtitles=False, fmt=None, options=None):
    """A clip of ``frames`` at 25 fps with one audio stream per codec in ``audio`` and optionally a subtitle."""
    rate = 16000
    with av.open(str(path), "w", format=fmt, options=options or {}) as c:
        v = c.add_stream(vcodec, rate=25)
        v.height, v.width = frames[0].shape[:2]
        v.pix_fmt = pix_fmt
        streams = []
        for codec in audio:
            a = c.add_stream(codec, rate=rate)
            a.layout = "mono"
            streams.append((a, "fltp" if codec == "aac" else "s16"))
        spf = rate // 25
        for i, img in enumerate(frames):
            for p in v.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
            for a, afmt in streams:
                x = np.sin(2 * np.pi * 440 * (np.arange(spf) + i * spf) / rate)[None] * 0.25
                data = x.astype(np.float32) if afmt == "fltp" else (x * 32767).astype(np.int16)
                fr = av.AudioFrame.from_ndarray(data, format=afmt, layout="mono")
                fr.sample_rate, fr.pts = rate, i * spf
                for p in a.encode(fr):
                    c.mux(p)
        for st in [v] + [a for a, _ in streams]:
            for p in st.encode(None):
                c.mux(p)
    return path


def infer_tiny(tiny_models, video, out, *extra):
    code, err = run(["--config", str(tiny_models["config"]), "--video", str(video), "--out", str(out),
                     "--progress", "false", "--coverage.identity", "false", *extra])
    rep = json.loads((Path(out) / "report.json").read_text()) if (Path(out) / "report.json").is_file() else None
    return code, err, rep


@pytest.mark.slow
def test_mjpeg_pcm_avi_and_every_stream_accounted_for(tiny_models, media_dir, tmp_path):
    from anonymizer.video import probe_video

    avi = write(tmp_path / "in.avi", grid_frames(media_dir), vcodec="mjpeg", pix_fmt="yuvj420p", audio=["pcm_s16le"])
    code, err, rep = infer_tiny(tiny_models, avi, tmp_path / "avi")
    assert code == 0, err
    (audio,) = [s for s in rep["input"]["streams"] if s["type"] == "audio"]
    assert audio["codec"] == "pcm_s16le" and audio["action"] == "transcode" and audio["to"] == "aac"
    assert probe_video(tmp_path / "avi" / "anonymized.mp4").audio_codec == "aac"
    # Two audio streams: both carried, both listed.
    mkv = write(tmp_path / "two.mkv", grid_frames(media_dir), audio=["aac", "pcm_s16le"], fmt="matroska")
    code, err, rep = infer_tiny(tiny_models, mkv, tmp_path / "two")
    assert code == 0, err
    actions = [(s["type"], s["action"]) for s in rep["input"]["streams"]]
    assert actions == [("video", "encode"), ("audio", "copy"), ("audio", "transcode")], actions
    with av.open(str(tmp_path / "two" / "anonymized.mp4")) as c:
        assert len(c.streams.audio) == 2


@pytest.mark.slow
def test_truncated_input_is_warned_and_strict_fails(tiny_models, media_dir, tmp_path):
    full = write(tmp_path / "full.mp4", grid_frames(media_dir, 30), audio=["aac"],
                 options={"movflags": "faststart"})
    data = full.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[:int(len(data) * 0.6)])
    code, err, rep = infer_tiny(tiny_models, cut, tmp_path / "lenient")
    assert code == 0, err
    tr = rep["input"]["truncation"]
    assert tr["expected_frames"] == 30 and tr["decoded_frames"] < 30 == rep["input"]["video"]["num_frames"]
    assert "video ends early" in err and f"decoded {tr['decoded_frames']} of 30 frames" in err
    assert rep["complete"] is False and any("ends early" in r for r in rep["incomplete"])
    code, err, rep = infer_tiny(tiny_models, cut, tmp_path / "strict", "--strict", "true")
    assert code == 2 and (tmp_path / "strict" / "anonymized.mp4").is_file() and rep["complete"] is False
    assert err.strip().splitlines()[-1].startswith("error: --strict:")


@pytest.mark.slow
def test_output_through_a_symlink_to_an_empty_directory(tiny_models, media_dir, tmp_path):
    clip = write(tmp_path / "in.mp4", grid_frames(media_dir, 4))
    target = tmp_path / "real"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    code, err, rep = infer_tiny(tiny_models, clip, link)
    assert code == 0, err
    assert link.is_symlink() and (target / "anonymized.mp4").is_file() and (target / "report.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary or lock left


@pytest.mark.slow
def test_bf16_pipeline_close_to_fp32(tiny_models, media_dir, tmp_path):
    """The whole pipeline at bf16 against 32: per-frame PSNR of the output videos (issue: >= 40 dB)."""
    from anonymizer.video import VideoReader

    clip = write(tmp_path / "in.mp4", grid_frames(media_dir, 8))
    outs = {}
    for p in ("32", "bf16"):
        code, err, rep = infer_tiny(tiny_models, clip, tmp_path / p, "--swap.precision", p, "--blend.mask", "crop",
                                    "--encode.crf", "0")
        assert code == 0, err
        assert rep["settings"]["swap"]["precision"] == p and rep["coverage"]["by_swap"] == 8  # the swap covers
        outs[p] = [f.image.astype(np.float64) for f in VideoReader(tmp_path / p / "anonymized.mp4")]
    for a, b in zip(outs["32"], outs["bf16"]):
        mse = np.mean((a - b) ** 2)
        assert mse == 0 or 10 * np.log10(255 ** 2 / mse) >= 40.0
