"""Video I/O: streaming decode, H.264 mp4 encode with the input's size, timing and audio, and bad-input errors."""
from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest

from anonymizer.video import (VideoReader, VideoWriter, audio_packets, count_frames, plan_timestamps,
                              probe_video)
from keepr.errors import KeeprError


def transcode(src, dst, audio="copy", preset="ultrafast"):
    """Decode ``src`` and re-encode it unchanged through VideoWriter (what infer does with no face swapped)."""
    r = VideoReader(src)
    frames = [(f.time, f.pts) for f in r]
    tb, pts = plan_timestamps([t for t, _ in frames], r.fps, r.time_base, [p for _, p in frames], r.start_time)
    with VideoWriter(dst, r.width, r.height, r.fps, audio_from=src, time_base=tb, start_time=r.start_time,
                     preset=preset, audio=audio) as w:
        for f in r:
            w.write(f.image, pts[f.index])
    return r


def make_video(path, width, height, n, fps=25, codec="mpeg4", container=None, audio_codec=None, pix_fmt="yuv420p"):
    """A small synthetic video (moving gradient), optionally with a sine-tone audio track."""
    with av.open(str(path), "w", format=container) as c:
        v = c.add_stream(codec, rate=fps)
        v.width, v.height, v.pix_fmt = width, height, pix_fmt
        a = None
        if audio_codec:
            a = c.add_stream(audio_codec, rate=16000)
            a.layout = "mono"
        yy, xx = np.mgrid[0:height, 0:width]
        for i in range(n):
            img = np.stack([(xx * 4 + i * 8) % 256, (yy * 4) % 256, np.full_like(xx, 128)], -1).astype(np.uint8)
            for p in v.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in v.encode(None):
            c.mux(p)
        if a is not None:
            samples = int(16000 * n / fps)
            t = np.arange(samples) / 16000.0
            pcm = (np.sin(2 * np.pi * 440 * t) * 8000).astype(np.int16)[None]
            if audio_codec == "pcm_u8":
                fmt, data = "u8", (pcm // 256 + 128).astype(np.uint8)
            elif audio_codec.startswith("pcm"):
                fmt, data = "s16", pcm
            else:
                fmt, data = "fltp", pcm.astype(np.float32) / 32768
            frame = av.AudioFrame.from_ndarray(data, format=fmt, layout="mono")
            frame.sample_rate, frame.pts = 16000, 0
            for p in a.encode(frame):
                c.mux(p)
            for p in a.encode(None):
                c.mux(p)
    return path


def test_reader_streams_frames(media_dir):
    r = VideoReader(media_dir / "videos" / "bbaf2n.mpg")
    assert (r.width, r.height, r.fps, r.has_audio) == (360, 288, Fraction(25), True)
    it = iter(r)
    first = next(it)
    assert first.index == 0 and first.image.shape == (288, 360, 3) and first.image.dtype == np.uint8
    rest = sum(1 for _ in it)
    assert rest == 74
    again = next(iter(r))  # a second pass starts from the first frame again
    assert np.array_equal(again.image, first.image)


def test_roundtrip_keeps_size_rate_count_and_audio(media_dir, tmp_path):
    src = media_dir / "videos" / "bbaf2n.mpg"
    out = tmp_path / "o.mp4"
    transcode(src, out)
    i, o = probe_video(src), probe_video(out)
    assert (o.width, o.height, o.codec) == (360, 288, "h264")
    assert o.fps == i.fps == 25
    assert count_frames(out) == count_frames(src) == 75
    assert o.has_audio and audio_packets(out) == audio_packets(src)  # mp2 packets copied bit-exactly
    # Untouched pixels come back equal up to codec error.
    diffs = [np.abs(a.image.astype(int) - b.image.astype(int)).mean() for a, b in zip(VideoReader(src), VideoReader(out))]
    assert len(diffs) == 75 and max(diffs) < 4.0


def test_roundtrip_mp4_aac_and_frame_offset(media_dir, tmp_path):
    src = media_dir / "videos" / "video_01.mp4"
    out = tmp_path / "o.mp4"
    transcode(src, out)
    i, o = probe_video(src), probe_video(out)
    assert o.fps == i.fps == Fraction(30000, 1001)
    assert count_frames(out) == 90
    assert audio_packets(out) == audio_packets(src)
    assert abs(o.duration - i.duration) < 1e-3


def test_matroska_millisecond_timestamps_give_exact_rate(media_dir, tmp_path):
    src = media_dir / "videos" / "asl_thanks.mkv"
    out = tmp_path / "o.mp4"
    transcode(src, out)
    o = probe_video(out)
    assert o.fps == 30 and count_frames(out) == 51 and not o.has_audio
    assert abs(o.duration - 51 / 30) < 1e-3


def test_gif_variable_delays_keep_timestamps(media_dir, tmp_path):
    src = media_dir / "videos" / "head-pose-face-detection-female.gif"
    out = tmp_path / "o.mp4"
    transcode(src, out)
    t_in = [f.time for f in VideoReader(src)]
    t_out = [f.time for f in VideoReader(out)]
    assert len(t_out) == len(t_in) == 23
    assert np.allclose(t_out, t_in, atol=1e-3)  # each frame shown when the GIF shows it
    assert abs(probe_video(out).duration - probe_video(src).duration) < 0.02


def test_odd_size_kept_with_yuv444(tmp_path):
    src = make_video(tmp_path / "odd.avi", 33, 25, 6, codec="ffv1", pix_fmt="yuv444p")
    out = tmp_path / "o.mp4"
    transcode(src, out)
    o = probe_video(out)
    assert (o.width, o.height) == (33, 25) and count_frames(out) == 6
    with av.open(str(out)) as c:
        assert c.streams.video[0].codec_context.pix_fmt == "yuv444p"


def test_audio_mp4_cannot_hold_is_reported_or_reencoded(tmp_path):
    src = make_video(tmp_path / "pcm.mkv", 64, 48, 10, audio_codec="pcm_u8")  # 8-bit PCM: not allowed in mp4
    with pytest.raises(KeeprError, match="pcm_u8.*aac"):
        transcode(src, tmp_path / "o.mp4", audio="copy")
    transcode(src, tmp_path / "aac.mp4", audio="aac")
    o = probe_video(tmp_path / "aac.mp4")
    assert o.has_audio and o.audio_codec == "aac" and count_frames(tmp_path / "aac.mp4") == 10
    transcode(src, tmp_path / "none.mp4", audio="none")
    assert not probe_video(tmp_path / "none.mp4").has_audio


def test_plan_timestamps_cfr_and_vfr():
    tb, pts = plan_timestamps([0.0, 0.033, 0.067, 0.1], Fraction(30), Fraction(1, 1000), [0, 33, 67, 100], 0.0)
    assert tb == Fraction(1, 30) and pts == [0, 1, 2, 3]
    tb, pts = plan_timestamps([0.0, 0.08, 0.17, 0.5], Fraction(25, 2), Fraction(1, 100), [0, 8, 17, 50], 0.0)
    assert tb == Fraction(1, 100) and pts == [0, 8, 17, 50]


@pytest.mark.parametrize("kind", ["missing", "empty", "random", "text", "image", "directory", "truncated_header"])
def test_bad_inputs_raise_one_line_errors(kind, tmp_path, media_dir):
    p = tmp_path / f"bad_{kind}.mp4"
    if kind == "empty":
        p.write_bytes(b"")
    elif kind == "random":
        p.write_bytes(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes())
    elif kind == "text":
        p = tmp_path / "notes.txt"
        p.write_text("this is not a video\n" * 50)
    elif kind == "image":
        p = media_dir / "photos" / "lisa" / "lisa1.jpg"
    elif kind == "directory":
        p = tmp_path
    elif kind == "truncated_header":
        p.write_bytes((media_dir / "videos" / "video_01.mp4").read_bytes()[:2000])
    with pytest.raises(KeeprError) as e:
        VideoReader(p)
    msg = str(e.value)
    assert "\n" not in msg and str(p) in msg
