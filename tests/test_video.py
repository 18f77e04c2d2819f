"""Video I/O: streaming decode, H.264 mp4 encode with the input's size, timing and audio, and bad-input errors."""
from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest

from anonymizer.video import VideoReader, audio_packets, count_frames, probe_video
from anonymizer.video_writer import VideoWriter, check_encode_settings, plan_timestamps
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
    diffs = [np.abs(a.image.astype(int) - b.image.astype(int)).mean()
             for a, b in zip(VideoReader(src), VideoReader(out))]
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


def test_audio_mp4_cannot_hold_is_reencoded_with_a_warning(tmp_path):
    src = make_video(tmp_path / "pcm.mkv", 64, 48, 10, audio_codec="pcm_u8")  # 8-bit PCM: not allowed in mp4
    with VideoWriter(tmp_path / "copy.mp4", 64, 48, 25, audio_from=src, preset="ultrafast") as w:
        for f in VideoReader(src):
            w.write(f.image)
    assert w.audio_summary() == {"mode": "aac", "codec": "pcm_u8"}
    assert len(w.plan.warnings) == 1 and "pcm_u8" in w.plan.warnings[0]
    assert probe_video(tmp_path / "copy.mp4").audio_codec == "aac"
    transcode(src, tmp_path / "aac.mp4", audio="aac")
    o = probe_video(tmp_path / "aac.mp4")
    assert o.has_audio and o.audio_codec == "aac" and count_frames(tmp_path / "aac.mp4") == 10
    transcode(src, tmp_path / "none.mp4", audio="none")
    assert not probe_video(tmp_path / "none.mp4").has_audio


def test_encode_settings_checked_up_front(media_dir, tmp_path):
    check_encode_settings(360, 288, 25, crf=18, preset="medium")
    check_encode_settings(33, 25, Fraction(30000, 1001), crf=0, preset="ultrafast")  # odd size: yuv444p
    with pytest.raises(KeeprError, match=r"encode.preset 'bogus': not an x264 preset \(ultrafast, .*placebo\)"):
        check_encode_settings(360, 288, 25, preset="bogus")
    for crf in (-1, 52, 18.5, "x"):
        with pytest.raises(KeeprError, match="encode.crf"):
            check_encode_settings(360, 288, 25, crf=crf)
    # The writer blames the encoder, not the audio, for a bad preset.
    with pytest.raises(KeeprError) as e:
        VideoWriter(tmp_path / "o.mp4", 360, 288, 25, audio_from=media_dir / "videos" / "bbaf2n.mpg", preset="bogus")
    assert "bogus" in str(e.value) and "audio" not in str(e.value) and "\n" not in str(e.value)


def make_clip(path, n=90, fps=25, vcodec="libx264", acodec="aac", fmt=None, pix_fmt="yuv420p", options=None):
    """A 160x120 noisy clip with audio interleaved frame by frame (so a byte cut hits both streams)."""
    w, h, rate = 160, 120, 16000
    with av.open(str(path), "w", format=fmt, options=options or {}) as c:
        v = c.add_stream(vcodec, rate=fps)
        v.width, v.height, v.pix_fmt = w, h, pix_fmt
        a = c.add_stream(acodec, rate=rate)
        a.layout = "mono"
        afmt = "fltp" if acodec == "aac" else "s16"
        rng = np.random.default_rng(0)
        spf = rate // fps
        for i in range(n):
            img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            for p in v.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
            x = np.sin(2 * np.pi * 440 * (np.arange(spf) + i * spf) / rate)[None] * 0.25
            data = x.astype(np.float32) if afmt == "fltp" else (x * 32767).astype(np.int16)
            fr = av.AudioFrame.from_ndarray(data, format=afmt, layout="mono")
            fr.sample_rate, fr.pts = rate, i * spf
            for p in a.encode(fr):
                c.mux(p)
        for st in (v, a):
            for p in st.encode(None):
                c.mux(p)
    return path


def cut(src, dst, fraction=0.6):
    data = src.read_bytes()
    dst.write_bytes(data[:int(len(data) * fraction)])
    return dst


@pytest.mark.parametrize("kind", ["faststart_mp4", "mpeg1_ps", "mpeg2_ps", "mjpeg_avi", "mkv"])
def test_truncation_detected(tmp_path, kind):
    kw = {"faststart_mp4": dict(options={"movflags": "faststart"}),
          "mpeg1_ps": dict(vcodec="mpeg1video", acodec="mp2", fmt="mpeg"),
          "mpeg2_ps": dict(vcodec="mpeg2video", acodec="mp2", fmt="mpeg"),
          "mjpeg_avi": dict(vcodec="mjpeg", acodec="pcm_s16le", pix_fmt="yuvj420p"),
          "mkv": dict()}[kind]
    ext = {"faststart_mp4": "mp4", "mpeg1_ps": "mpg", "mpeg2_ps": "mpg", "mjpeg_avi": "avi", "mkv": "mkv"}[kind]
    full = make_clip(tmp_path / f"full.{ext}", **kw)
    r = VideoReader(full)
    assert r.truncation is None and sum(1 for _ in r) == 90
    assert r.truncation is None and r.decoded_frames == 90 and r.truncation_message() is None

    r = VideoReader(cut(full, tmp_path / f"cut.{ext}"))
    n = sum(1 for _ in r)
    tr = r.truncation
    assert tr is not None and tr["decoded_frames"] == n == r.decoded_frames and 30 < n < 90, tr
    assert abs(tr["decoded_seconds"] - n / 25) < 0.05
    if kind in ("faststart_mp4", "mjpeg_avi", "mkv"):  # the container announces the full length
        assert tr["expected_frames"] in (90, 91, 92) and abs(tr["expected_seconds"] - 3.6) < 0.1
    else:  # MPEG-PS has no length field: its duration is guessed from the (cut) end; the last frame is incomplete
        assert tr["expected_frames"] is None and "incomplete" in tr["error"]
    msg = r.truncation_message()
    assert "\n" not in msg and str(n) in msg
    assert sum(1 for _ in r) == n and r.truncation == tr  # every pass gives the same answer


def test_cut_mp4_with_index_at_the_end_is_refused(tmp_path):
    bad = cut(make_clip(tmp_path / "full.mp4"), tmp_path / "cut.mp4")
    with pytest.raises(KeeprError, match="cut short") as e:
        VideoReader(bad)
    assert "\n" not in str(e.value)


def _tkhd_matrix(path):
    """The a, b, c, d entries (16.16 fixed point) of the first track header's matrix, read from the mp4 bytes."""
    data = path.read_bytes()
    i = data.index(b"tkhd") - 4
    version = data[i + 8]
    matrix_at = i + 8 + 4 + (32 if version == 1 else 20) + 16  # after version/flags, times, ..., volume
    vals = np.frombuffer(data[matrix_at:matrix_at + 36], dtype=">i4")
    return [int(vals[0]), int(vals[1]), int(vals[3]), int(vals[4])]


def make_sideways(path, upright, turn_ccw):
    """Store ``upright`` frames turned sideways, with a display matrix saying to turn them ``turn_ccw`` degrees
    counter-clockwise to show them upright (what a phone writes)."""
    stored = np.ascontiguousarray(np.rot90(upright, k=-turn_ccw // 90))  # undo the display turn
    with av.open(str(path), "w") as c:
        v = c.add_stream("libx264", rate=25)
        v.height, v.width = stored.shape[:2]
        v.pix_fmt = "yuv420p"
        v.set_display_rotation(turn_ccw)
        for _ in range(5):
            for p in v.encode(av.VideoFrame.from_ndarray(stored, format="rgb24")):
                c.mux(p)
        for p in v.encode(None):
            c.mux(p)
    return path


def portrait_with_marker():
    img = np.full((160, 120, 3), 40, np.uint8)  # upright: 120 wide, 160 tall
    img[8:40, 8:40] = (255, 255, 255)  # marker in the top-left corner
    img[120:150, 80:110] = (255, 0, 0)  # a red one bottom-right
    return img


def marker_corner(image):
    h, w = image.shape[:2]
    white = (image.astype(int).sum(-1) > 600)
    ys, xs = np.nonzero(white)
    return ("top" if ys.mean() < h / 2 else "bottom") + "-" + ("left" if xs.mean() < w / 2 else "right")


@pytest.mark.parametrize("turn", [90, 270, 180])
def test_rotated_clip_decoded_upright_and_written_upright(tmp_path, turn):
    src = make_sideways(tmp_path / "phone.mp4", portrait_with_marker(), turn)
    if turn in (90, 270):  # independent check of the tag in the file (QuickTime tkhd matrix, y axis down)
        a, b, c, d = _tkhd_matrix(src)
        # 'turn 90 counter-clockwise' maps x' = y, y' = -x: b = -1, c = 1 (and the reverse for 270)
        assert (a, d) == (0, 0) and (b, c) == ((-65536, 65536) if turn == 90 else (65536, -65536))
        with av.open(str(src)) as cont:
            s = cont.streams.video[0]
            assert (s.codec_context.width, s.codec_context.height) == (160, 120)  # stored sideways
    r = VideoReader(src)
    assert r.rotation == turn and (r.width, r.height) == (120, 160)
    frames = list(r)
    assert len(frames) == 5 and frames[0].image.shape == (160, 120, 3)
    assert marker_corner(frames[0].image) == "top-left"
    assert frames[0].image[135, 95, 0] > 200 and frames[0].image[135, 95, 1] < 60  # red stays bottom-right

    out = tmp_path / "o.mp4"
    with VideoWriter(out, r.width, r.height, r.fps, preset="ultrafast") as w:
        for f in frames:
            w.write(f.image)
    back = VideoReader(out)
    assert back.rotation == 0 and (back.width, back.height) == (120, 160)  # upright pixels, no tag
    assert marker_corner(next(iter(back)).image) == "top-left"


def test_legacy_rotate_tag_is_clockwise(tmp_path, monkeypatch):
    """'rotate=90' (old ffmpeg / phones) means: turn the picture 90 degrees clockwise to show it."""
    from anonymizer import video

    class Stream:
        metadata = {"rotate": "90"}

    class FrameNoMatrix:
        rotation = 0

    assert video._rotation(Stream(), FrameNoMatrix()) == 270  # 90 clockwise = 270 counter-clockwise
    img = np.zeros((2, 3, 3), np.uint8)
    img[0, 0] = 255  # top-left of the stored picture goes to the top-right when turned clockwise
    up = video._upright(img, 270)
    assert up.shape == (3, 2, 3) and up[0, 1, 0] == 255


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
