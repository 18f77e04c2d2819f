"""Stream plan: every input stream is copied, transcoded or dropped (with the reason), decided before any work."""
from __future__ import annotations

import json
from fractions import Fraction

import av
import numpy as np
import pytest
from av.subtitles.subtitle import SubtitleSet

import anonymizer.streams as streams
from anonymizer.streams import plan_streams
from anonymizer.video import VideoReader, count_frames
from anonymizer.video_writer import VideoWriter
from keepr.errors import KeeprError

ASS_HEADER = (b"[Script Info]\nScriptType: v4.00+\nPlayResX: 384\nPlayResY: 288\n\n[V4+ Styles]\n"
              b"Format: Name, Fontname, Fontsize, PrimaryColour, SecondaryColour, OutlineColour, BackColour, Bold, "
              b"Italic, Underline, StrikeOut, ScaleX, ScaleY, Spacing, Angle, BorderStyle, Outline, Shadow, Alignment, "
              b"MarginL, MarginR, MarginV, Encoding\nStyle: Default,Arial,16,&Hffffff,&Hffffff,&H0,&H0,0,0,0,0,100,"
              b"100,0,0,1,1,0,2,10,10,10,0\n\n[Events]\nFormat: Layer, Start, End, Style, Name, MarginL, MarginR, "
              b"MarginV, Effect, Text\n")
SAMPLE_FORMATS = {"aac": "fltp", "mp2": "s16", "ac3": "fltp", "eac3": "fltp", "libmp3lame": "s16p", "flac": "s16",
                  "alac": "s16p", "libopus": "s16", "pcm_s16le": "s16", "pcm_u8": "u8"}


def make_clip(path, n=10, fps=25, size=(64, 48), vcodec="libx264", audio=(), subtitles=(), fmt=None,
              pix_fmt="yuv420p", second_video=False, attachment=False, rate=48000):
    """A small clip with interleaved streams: ``audio`` is a list of (codec, language), ``subtitles`` of codecs."""
    w, h = size
    with av.open(str(path), "w", format=fmt) as c:
        v = c.add_stream(vcodec, rate=fps)
        v.width, v.height, v.pix_fmt = w, h, pix_fmt
        v2 = None
        if second_video:
            v2 = c.add_stream("libx264", rate=fps)
            v2.width, v2.height, v2.pix_fmt = w, h, "yuv420p"
        auds = []
        for codec, lang in audio:
            a = c.add_stream(codec, rate=rate)
            a.layout = "mono"
            if lang:
                a.metadata["language"] = lang
            auds.append([a, SAMPLE_FORMATS[codec], 0])
        subs = []
        for codec in subtitles:
            s = c.add_stream(codec)
            s.codec_context.time_base = Fraction(1, 1000)
            s.codec_context.subtitle_header = ASS_HEADER
            subs.append(s)
        if attachment:
            c.add_attachment("notes.txt", "text/plain", b"not a font")
        yy, xx = np.mgrid[0:h, 0:w]
        for i in range(n):
            img = np.stack([(xx * 4 + i * 8) % 256, (yy * 4) % 256, np.full_like(xx, 128)], -1).astype(np.uint8)
            for st in [v] + ([v2] if v2 is not None else []):
                for p in st.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    c.mux(p)
            for entry in auds:
                a, sfmt, done = entry
                cc = a.codec_context
                while done < (i + 1) * rate / fps:
                    k = cc.frame_size or 1024
                    t = (np.arange(k) + done) / rate
                    x = np.sin(2 * np.pi * 440 * t) * 0.25
                    data = (x * 32767).astype(np.int16) if sfmt.startswith("s16") else x.astype(np.float32)
                    if sfmt == "u8":
                        data = (x * 127 + 128).astype(np.uint8)
                    fr = av.AudioFrame.from_ndarray(data[None], format=sfmt, layout="mono")
                    fr.sample_rate, fr.pts = rate, done
                    done += k
                    for p in a.encode(fr):
                        c.mux(p)
                entry[2] = done
            if i % 5 == 0:
                for s in subs:
                    ss = SubtitleSet.create(f"0,0,Default,,0,0,0,,Line {i}".encode(), 0, 150, pts=i * 40)
                    p = s.codec_context.encode_subtitle(ss)
                    p.stream, p.time_base, p.pts, p.dts, p.duration = s, Fraction(1, 1000), i * 40, i * 40, 150
                    c.mux(p)
        for st in [v] + ([v2] if v2 is not None else []):
            for p in st.encode(None):
                c.mux(p)
        for a, _, _ in auds:
            for p in a.encode(None):
                c.mux(p)
    return path


def write_through(src, dst, plan):
    """Re-encode ``src`` unchanged through VideoWriter following ``plan``."""
    r = VideoReader(src)
    with VideoWriter(dst, r.width, r.height, r.fps, start_time=r.start_time, preset="ultrafast", plan=plan) as w:
        for f in r:
            w.write(f.image)
    return r


def packets(path, index):
    with av.open(str(path)) as c:
        return [bytes(p) for p in c.demux(c.streams[index]) if p.size]


def test_mpeg_ps_plan_copies_mp2(media_dir):
    plan = plan_streams(media_dir / "videos" / "bbaf2n.mpg", "copy")
    assert [(a["type"], a["codec"], a["action"]) for a in plan.as_list()] == [
        ("video", "mpeg1video", "encode"), ("audio", "mp2", "copy")]
    assert plan.warnings == [] and plan.audio_summary() == {"mode": "copy", "codec": "mp2"}


def test_every_stream_listed_kept_or_dropped_with_reason(tmp_path):
    src = make_clip(tmp_path / "multi.mkv", audio=[("aac", "eng"), ("pcm_s16le", "fra")],
                    subtitles=["subrip", "ass"], second_video=True, attachment=True)
    plan = plan_streams(src, "copy")
    listed = plan.as_list()
    json.dumps(listed)  # goes into report.json as is
    got = {(a["type"], a["codec"]): (a["action"], a.get("to")) for a in listed}
    with av.open(str(src)) as c:
        assert len(listed) == len(c.streams)  # every input stream is listed
    assert got[("video", "h264")] in {("encode", "h264"), ("drop", None)}
    assert [a["action"] for a in listed if a["type"] == "video"] == ["encode", "drop"]
    assert got[("audio", "aac")] == ("copy", None)
    assert got[("audio", "pcm_s16le")] == ("transcode", "aac")
    assert got[("subtitle", "subrip")] == ("transcode", "mov_text")
    assert got[("subtitle", "ass")] == ("transcode", "mov_text")
    assert got[("attachment", None)][0] == "drop"
    warned = {a["index"] for a in listed if "warning" in a}
    assert warned == {a["index"] for a in listed if a["action"] == "drop" or a["action"] == "transcode"}
    assert all("\n" not in w for w in plan.warnings)
    pcm = next(a for a in listed if a["codec"] == "pcm_s16le")
    assert "pcm_s16le" in pcm["reason"] and pcm["language"] == "fra"

    out = tmp_path / "o.mp4"
    write_through(src, out, plan)
    with av.open(str(out)) as c:
        kinds = [(s.type, s.codec_context.name, s.metadata.get("language")) for s in c.streams]
    assert kinds == [("video", "h264", "und"), ("audio", "aac", "eng"), ("audio", "aac", "fra"),
                     ("subtitle", "mov_text", "und"), ("subtitle", "mov_text", "und")]
    aac_in = next(a["index"] for a in listed if a["codec"] == "aac")
    assert packets(out, 1) == packets(src, aac_in)  # the copied AAC is bit-exact
    with av.open(str(out)) as c:
        s = c.streams.subtitles[0]
        texts = [(round(float(p.pts * p.time_base), 2), bytes(p)[2:]) for p in c.demux(s) if p.size > 2]
        assert texts == [(0.0, b"Line 0"), (0.2, b"Line 5")]
    with av.open(str(out)) as c:
        a = c.streams.audio[1]
        dur = sum(f.samples for f in c.decode(a)) / a.codec_context.sample_rate
    assert abs(dur - 10 / 25) < 0.05  # the transcoded audio is as long as the input's
    assert count_frames(out) == 10


@pytest.mark.parametrize("mode", ["aac", "none"])
def test_audio_modes_apply_to_every_audio_stream(tmp_path, mode):
    src = make_clip(tmp_path / "two.mkv", audio=[("aac", None), ("mp2", None)])
    plan = plan_streams(src, mode)
    audio = [a for a in plan.as_list() if a["type"] == "audio"]
    if mode == "aac":
        assert [(a["action"], a["to"]) for a in audio] == [("transcode", "aac")] * 2
        assert plan.warnings == []  # asked for
    else:
        assert [a["action"] for a in audio] == ["drop"] * 2
        assert all("by request" in a["reason"] for a in audio) and len(plan.warnings) == 2
    out = tmp_path / "o.mp4"
    write_through(src, out, plan)
    with av.open(str(out)) as c:
        assert [s.codec_context.name for s in c.streams.audio] == (["aac", "aac"] if mode == "aac" else [])


def test_mjpeg_pcm_avi_is_transcoded_not_failing_at_the_end(tmp_path):
    src = make_clip(tmp_path / "cam.avi", vcodec="mjpeg", pix_fmt="yuvj420p", audio=[("pcm_s16le", None)])
    plan = plan_streams(src, "copy")
    assert [(a.action, a.to) for a in plan.streams] == [("encode", "h264"), ("transcode", "aac")]
    assert len(plan.warnings) == 1 and "pcm_s16le" in plan.warnings[0]
    write_through(src, tmp_path / "o.mp4", plan)
    with av.open(str(tmp_path / "o.mp4")) as c:
        assert [s.codec_context.name for s in c.streams] == ["h264", "aac"]


@pytest.mark.parametrize("codec", ["aac", "mp2", "libmp3lame", "ac3", "eac3", "flac", "alac", "libopus"])
def test_known_mp4_audio_codecs_really_copy(tmp_path, codec):
    """The list of codecs copied into mp4 is checked against the muxer: each is copied bit-exactly."""
    rate = 48000 if codec != "mp2" else 44100
    src = make_clip(tmp_path / "a.mkv", audio=[(codec, None)], rate=rate)
    plan = plan_streams(src, "copy")
    assert plan.streams[1].codec in streams.MP4_AUDIO and plan.streams[1].action == "copy", plan.as_list()
    write_through(src, tmp_path / "o.mp4", plan)
    got, want = packets(tmp_path / "o.mp4", 1), packets(src, 1)
    if codec == "alac":  # Matroska keeps no duration for the short last ALAC packet; mp4 readers then skip it
        got, want = got[:len(want) - 1], want[:-1]
    assert got == want


def test_copy_is_checked_with_the_muxer(tmp_path, monkeypatch):
    """A codec wrongly listed as copyable is caught by the throw-away mp4 write and transcoded instead."""
    src = make_clip(tmp_path / "u8.mkv", audio=[("pcm_u8", None)])
    monkeypatch.setattr(streams, "MP4_AUDIO", streams.MP4_AUDIO + ("pcm_u8",))
    plan = plan_streams(src, "copy")
    a = plan.streams[1]
    assert (a.action, a.to) == ("transcode", "aac") and "mp4 cannot hold pcm_u8" in a.reason


def test_bad_audio_mode():
    with pytest.raises(KeeprError, match="encode.audio"):
        plan_streams("whatever.mp4", "mp3")
