"""Streaming video input/output with PyAV.

``VideoReader`` decodes one frame at a time (never the whole video in memory) and can be iterated several times,
each pass reopening the file. ``VideoWriter`` encodes H.264 into mp4 with the input's size and timestamps, and copies
the input's audio packets unchanged (remuxed, interleaved as the video is written, so memory stays bounded).

Choices:
- Size: the output keeps the input size exactly. H.264 in 4:2:0 needs even width and height, so odd-sized inputs are
  encoded as yuv444p (High 4:4:4 profile; some hardware players cannot play it) instead of padding or cropping.
- Timing: each output frame gets its input frame's presentation timestamp (shifted so the earliest stream starts at 0)
  in the input's time base, so frame count, duration and average frame rate match, including variable-delay inputs
  such as GIFs. The stream's nominal rate is the input's average rate.
- Audio: ``audio="copy"`` (default) remuxes the first audio stream's packets bit-exactly. mp4 holds AAC, MP3, MP2,
  AC-3, Opus, FLAC, ...; for a codec it cannot hold (e.g. PCM) the writer fails with a message naming the codec and
  the alternatives ``audio="aac"`` (re-encode) or ``audio="none"``.
- Colour: RGB <-> YUV conversions use swscale's defaults (BT.601) on both sides, so pixels that the pipeline does not
  touch come back equal up to codec error.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator, NamedTuple

import av
import numpy as np

from keepr.errors import KeeprError

# Demuxers that read a single still image (or an image sequence): such files are refused as videos.
IMAGE_FORMATS = {"image2", "image2pipe", "apng"}
# Demuxers that render text files (ANSI art etc.) as "video": a text file is not a video.
TEXT_FORMATS = {"tty", "bin", "xbin", "adf", "idf", "srt", "ass", "webvtt"}
# Container names ffmpeg uses for its mp4 muxer family.
AUDIO_MODES = ("copy", "aac", "none")


@dataclass
class VideoInfo:
    """What the pipeline needs to know about an input video (all JSON-able via ``as_dict``)."""

    path: str
    format: str  # demuxer name, e.g. 'mpeg', 'mov,mp4,m4a,3gp,3g2,mj2', 'gif'
    codec: str  # video codec name
    width: int
    height: int
    fps: Fraction  # average frame rate
    time_base: Fraction  # video stream time base
    num_frames: int | None  # from the container when it says; None when unknown
    duration: float | None  # seconds, when known
    has_audio: bool
    audio_codec: str | None
    audio_sample_rate: int | None

    def as_dict(self) -> dict:
        d = asdict(self)
        d["fps"] = float(self.fps)
        d["fps_fraction"] = f"{self.fps.numerator}/{self.fps.denominator}"
        d["time_base"] = f"{self.time_base.numerator}/{self.time_base.denominator}"
        return d


class Frame(NamedTuple):
    """One decoded frame: running index, RGB uint8 [H,W,3], presentation timestamp (stream time base), seconds."""

    index: int
    image: np.ndarray
    pts: int | None
    time: float | None


def _open_input(path: str | os.PathLike) -> av.container.InputContainer:
    """Open ``path`` for reading, turning every way it can fail into a one-line KeeprError."""
    p = Path(path)
    if not p.exists():
        raise KeeprError(f"{p}: no such file")
    if p.is_dir():
        raise KeeprError(f"{p}: is a directory, not a video file")
    if p.stat().st_size == 0:
        raise KeeprError(f"{p}: empty file")
    try:
        return av.open(str(p), mode="r")
    except av.error.FFmpegError as exc:
        raise KeeprError(f"{p}: not a readable video (corrupt or not a video file: {exc.strerror})") from None
    except (OSError, ValueError) as exc:
        raise KeeprError(f"{p}: cannot open: {exc}") from None


def _video_stream(container, path) -> av.video.stream.VideoStream:
    fmt = container.format.name
    if fmt in IMAGE_FORMATS or fmt.endswith("_pipe"):
        raise KeeprError(f"{path}: is a still image ({fmt}), not a video")
    if fmt in TEXT_FORMATS:
        raise KeeprError(f"{path}: is a text file ({fmt}), not a video")
    if not container.streams.video:
        raise KeeprError(f"{path}: has no video stream")
    return container.streams.video[0]


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Read a video's header and decode its first frame, to fail early on anything that is not a usable video."""
    with _open_input(path) as container:
        stream = _video_stream(container, path)
        cc = stream.codec_context
        width, height = int(cc.width), int(cc.height)
        try:
            first = next(container.decode(stream), None)
        except av.error.FFmpegError as exc:
            raise KeeprError(f"{path}: cannot decode video ({exc.strerror})") from None
        if first is None:
            raise KeeprError(f"{path}: no decodable video frames (corrupt or empty video)")
        if width <= 0 or height <= 0:
            width, height = first.width, first.height
        fps = stream.average_rate or stream.guessed_rate or stream.base_rate
        if not fps or fps <= 0:
            fps = Fraction(25, 1)
        fps = Fraction(fps)
        duration = None
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        audio = container.streams.audio[0] if container.streams.audio else None
        return VideoInfo(
            path=str(path),
            format=container.format.name,
            codec=cc.name,
            width=width,
            height=height,
            fps=fps,
            time_base=Fraction(stream.time_base) if stream.time_base else Fraction(1, 1) / fps,
            num_frames=int(stream.frames) if stream.frames else None,
            duration=duration,
            has_audio=audio is not None,
            audio_codec=audio.codec_context.name if audio is not None else None,
            audio_sample_rate=int(audio.codec_context.sample_rate) if audio is not None else None,
        )


class VideoReader:
    """Stream RGB uint8 frames of a video; each ``iter()`` is a fresh pass over the file.

    Attributes mirror ``VideoInfo``: ``fps``, ``width``, ``height``, ``num_frames`` (None when the container does not
    say), ``has_audio``, ``time_base``, ``start_time`` (seconds of the earliest stream start, the timestamp origin
    ``VideoWriter`` uses).
    """

    def __init__(self, path: str | os.PathLike, threads: int = 0):
        self.path = str(path)
        self.info = probe_video(path)
        self.threads = threads  # decoder threads; 0 = let FFmpeg choose
        with _open_input(path) as c:
            starts = [s.start_time * s.time_base for s in c.streams if s.type in ("video", "audio")
                      and s.start_time is not None and s.time_base is not None]
            v = c.streams.video[0]
            self.video_start = float(v.start_time * v.time_base) if v.start_time is not None else 0.0
        self.start_time = float(min(starts)) if starts else 0.0

    fps = property(lambda self: self.info.fps)
    width = property(lambda self: self.info.width)
    height = property(lambda self: self.info.height)
    num_frames = property(lambda self: self.info.num_frames)
    has_audio = property(lambda self: self.info.has_audio)
    time_base = property(lambda self: self.info.time_base)

    def estimated_frames(self) -> int | None:
        """Frame count from the container, else duration x fps (for progress bars only)."""
        if self.info.num_frames:
            return self.info.num_frames
        if self.info.duration:
            return int(round(self.info.duration * float(self.info.fps)))
        return None

    def __iter__(self) -> Iterator[Frame]:
        container = _open_input(self.path)
        try:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            if self.threads:
                stream.codec_context.thread_count = self.threads
            index = 0
            try:
                for frame in container.decode(stream):
                    if frame.width != self.width or frame.height != self.height or frame.format.name != "rgb24":
                        frame = frame.reformat(width=self.width, height=self.height, format="rgb24")
                    image = frame.to_ndarray()
                    t = float(frame.pts * frame.time_base) if frame.pts is not None and frame.time_base else None
                    yield Frame(index, image, frame.pts, t)
                    index += 1
            except av.error.FFmpegError as exc:
                raise KeeprError(f"{self.path}: decoding failed at frame {index} ({exc.strerror})") from None
        finally:
            container.close()


class VideoWriter:
    """Encode RGB uint8 frames to an H.264 mp4 of fixed size, copying the audio of ``audio_from``.

    ``write(image, pts)`` takes the frame's presentation timestamp in ``time_base``, already relative to the output's
    origin (see ``plan_timestamps``), or None for ``index / fps``. ``start_time`` (seconds) is the input time that
    becomes 0 in the output; it is subtracted from the copied audio timestamps so audio/video sync is kept. Call
    ``close()`` (or use as a context manager) to flush.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        width: int,
        height: int,
        fps: Fraction | float,
        audio_from: str | os.PathLike | None = None,
        time_base: Fraction | None = None,  # unit of the timestamps given to write(); default 1/fps
        start_time: float = 0.0,  # input time (s) mapped to output time 0; shifts the copied audio
        crf: int = 18,  # x264 quality (0 = lossless, 18 ~ visually lossless)
        preset: str = "medium",  # x264 speed/size trade-off
        audio: str = "copy",  # 'copy' | 'aac' | 'none'
    ):
        if audio not in AUDIO_MODES:
            raise KeeprError(f"audio mode must be one of {AUDIO_MODES}, got {audio!r}")
        self.path = str(path)
        self.width, self.height = int(width), int(height)
        self.fps = Fraction(fps).limit_denominator(1_000_000)
        self.time_base = Fraction(time_base) if time_base else 1 / self.fps
        self.start_time = float(start_time)
        self.pix_fmt = "yuv420p" if (self.width % 2 == 0 and self.height % 2 == 0) else "yuv444p"
        self.frames_written = 0
        self._last_pts = None
        self._closed = False
        try:
            self.container = av.open(self.path, mode="w", format="mp4")
        except (av.error.FFmpegError, OSError) as exc:
            raise KeeprError(f"{self.path}: cannot create output video ({exc})") from None
        try:
            self.stream = self.container.add_stream("libx264", rate=self.fps)
            self.stream.width, self.stream.height = self.width, self.height
            self.stream.pix_fmt = self.pix_fmt
            self.stream.codec_context.time_base = self.time_base
            self.stream.options = {"crf": str(int(crf)), "preset": preset}
            self._audio_in = None
            self._audio_out = None
            self._audio_packets = None
            self._audio_mode = "none"
            if audio_from is not None and audio != "none":
                self._open_audio(audio_from, audio)
            self.container.start_encoding()
        except KeeprError:
            self._abort()
            raise
        except (av.error.FFmpegError, ValueError) as exc:
            self._abort()
            why = getattr(exc, "strerror", None) or str(exc)
            if self._audio_in is not None and self._audio_mode == "copy":
                name = self._audio_codec_name
                raise KeeprError(
                    f"{audio_from}: its audio codec '{name}' cannot be copied into mp4 ({why}); "
                    "use audio 'aac' to re-encode it or 'none' to drop it") from None
            raise KeeprError(f"{self.path}: cannot start the output video ({why})") from None

    # --- audio --------------------------------------------------------------------------------------------
    def _open_audio(self, src, mode):
        ain = _open_input(src)
        if not ain.streams.audio:
            ain.close()
            return
        self._audio_in = ain
        self._audio_mode = mode
        self._audio_out = None
        a = ain.streams.audio[0]
        self._audio_codec_name = a.codec_context.name
        if mode == "copy":
            self._audio_out = self.container.add_stream_from_template(a)
            self._audio_packets = (p for p in ain.demux(a) if p.dts is not None or p.pts is not None)
        else:
            rate = a.codec_context.sample_rate or 44100
            self._audio_out = self.container.add_stream("aac", rate=rate)
            channels = a.codec_context.layout.nb_channels if a.codec_context.layout else 2
            layout = {1: "mono", 2: "stereo", 6: "5.1"}.get(channels, "stereo")  # Matroska may say '1 channels'
            self._audio_out.layout = layout
            self._audio_out.format = "fltp"
            self._resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate)
            self._audio_packets = self._reencoded_audio(a)
        self._audio_tb = a.time_base
        self._audio_offset = int(round(Fraction(self.start_time).limit_denominator(1_000_000) / a.time_base))
        self._pending = None  # the next packet not yet muxed

    def _reencoded_audio(self, a):
        """Decode, resample and AAC-encode the input audio; yields packets in the output stream's time base."""
        for frame in self._audio_in.decode(a):
            for rf in self._resampler.resample(frame):
                rf.pts = None
                yield from self._audio_out.encode(rf)
        for rf in self._resampler.resample(None):
            yield from self._audio_out.encode(rf)
        yield from self._audio_out.encode(None)

    def _mux_audio_until(self, t: float | None):
        """Copy audio packets whose timestamp is <= ``t`` seconds (all remaining when ``t`` is None)."""
        if self._audio_packets is None:
            return
        while True:
            pkt = self._pending if self._pending is not None else next(self._audio_packets, None)
            self._pending = None
            if pkt is None:
                self._audio_packets = None
                return
            if self._audio_mode == "copy":
                ts = pkt.pts if pkt.pts is not None else pkt.dts
                pt = float((ts - self._audio_offset) * self._audio_tb)
                if t is not None and pt > t:
                    self._pending = pkt
                    return
                if pkt.pts is not None:
                    pkt.pts -= self._audio_offset
                if pkt.dts is not None:
                    pkt.dts -= self._audio_offset
            elif t is not None and pkt.pts is not None and pkt.time_base and float(pkt.pts * pkt.time_base) > t:
                self._pending = pkt  # re-encoded audio (starts at 0): interleave it with the video too
                return
            pkt.stream = self._audio_out
            self.container.mux(pkt)

    # --- video --------------------------------------------------------------------------------------------
    def write(self, image: np.ndarray, pts: int | None = None) -> None:
        """Encode one RGB uint8 [H,W,3] frame at ``pts`` (in ``time_base``; None = next frame at ``fps``)."""
        if image.shape != (self.height, self.width, 3) or image.dtype != np.uint8:
            raise ValueError(f"frame must be uint8 [{self.height},{self.width},3], got {image.dtype} {image.shape}")
        if pts is None:
            pts = int(round(self.frames_written / self.fps / self.time_base))
        pts = int(pts)
        if self._last_pts is not None and pts <= self._last_pts:
            pts = self._last_pts + 1  # keep timestamps strictly increasing (broken or duplicated input pts)
        self._last_pts = pts
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        frame.pts = pts
        frame.time_base = self.time_base
        self._mux_audio_until(float(pts * self.time_base))
        for packet in self.stream.encode(frame):
            self.container.mux(packet)
        self.frames_written += 1

    def close(self) -> None:
        """Flush the encoder, copy the remaining audio and finish the file."""
        if self._closed:
            return
        self._closed = True
        try:
            for packet in self.stream.encode(None):
                self.container.mux(packet)
            self._mux_audio_until(None)
        finally:
            self.container.close()
            if self._audio_in is not None:
                self._audio_in.close()

    def audio_summary(self) -> dict | None:
        """What happened to the input's audio: None (no audio) or {'mode': 'copy'|'aac', 'codec': input codec}."""
        if self._audio_in is None:
            return None
        return {"mode": self._audio_mode, "codec": self._audio_codec_name}

    def _abort(self) -> None:
        self._closed = True
        for c in (getattr(self, "container", None), getattr(self, "_audio_in", None)):
            try:
                if c is not None:
                    c.close()
            except Exception:  # noqa: BLE001 - best effort cleanup of a failed writer
                pass

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort()


def plan_timestamps(times: list[float | None], fps: Fraction, time_base: Fraction, pts: list[int | None],
                    origin: float) -> tuple[Fraction, list[int]]:
    """Choose output timestamps for frames whose input times (s) and pts (in ``time_base``) are known.

    Constant-rate inputs (every frame within a quarter frame of ``t0 + i / fps``) get exact CFR timestamps in units of
    ``1 / fps`` (container rounding such as Matroska's milliseconds is removed, so the output's average rate equals
    the input's); anything else (e.g. GIF delays) keeps its own timestamps in ``time_base``. ``origin`` (s) becomes 0.
    Returns (output time base, pts per frame).
    """
    n = len(times)
    if n == 0:
        return Fraction(1, 1) / fps, []
    if any(t is None for t in times):
        return Fraction(1, 1) / fps, list(range(n))
    t0 = times[0]
    period = 1.0 / float(fps)
    if all(abs(t - (t0 + i * period)) < 0.25 * period for i, t in enumerate(times)):
        start = int(round((t0 - origin) * float(fps)))
        return Fraction(1, 1) / fps, [start + i for i in range(n)]
    shift = int(round(Fraction(origin).limit_denominator(1_000_000) / time_base))
    out, last = [], None
    for p in pts:
        q = int(p) - shift
        if last is not None and q <= last:
            q = last + 1
        out.append(q)
        last = q
    return Fraction(time_base), out


def audio_packets(path: str | os.PathLike) -> list[bytes]:
    """Raw bytes of every packet of the first audio stream (for checking that audio was copied unchanged)."""
    with _open_input(path) as c:
        if not c.streams.audio:
            return []
        return [bytes(p) for p in c.demux(c.streams.audio[0]) if p.size]


def count_frames(path: str | os.PathLike) -> int:
    """Decode a video and count its frames (probing helper for tests and reports)."""
    with _open_input(path) as c:
        return sum(1 for _ in c.decode(c.streams.video[0]))
