"""Streaming video input with PyAV (the output side is :mod:`anonymizer.video_writer`).

``VideoReader`` decodes one frame at a time (never the whole video in memory) and can be iterated several times,
each pass reopening the file. ``anonymizer.video_writer.VideoWriter`` encodes H.264 into mp4 with the input's size
and timestamps, and carries the input's other streams as planned by :func:`anonymizer.streams.plan_streams` (remuxed
or transcoded, interleaved as the video is written, so memory stays bounded).

Choices:
- Size: the output keeps the (upright) input size exactly. H.264 in 4:2:0 needs even width and height, so odd-sized
  inputs are encoded as yuv444p (High 4:4:4 profile; some hardware players cannot play it) instead of padding or
  cropping.
- Rotation: a clip stored sideways with a rotation tag (display matrix side data, or the legacy ``rotate`` metadata
  tag) is decoded upright: ``VideoReader`` turns each frame as a player would, reports the upright ``width`` and
  ``height`` and the tag in ``rotation``. The output is written as upright pixels with no rotation tag, so it plays
  in the same orientation as the input everywhere, including players that ignore the tag. Flips in a display matrix
  are not applied.
- Timing: each output frame gets its input frame's presentation timestamp (shifted so the earliest stream starts at 0)
  in the input's time base, so frame count, duration and average frame rate match, including variable-delay inputs
  such as GIFs. The stream's nominal rate is the input's average rate.
- Other streams: see :mod:`anonymizer.streams`. With ``audio="copy"`` (default) every audio stream is kept: remuxed
  bit-exactly when mp4 holds the codec (AAC, MP3, MP2, AC-3, Opus, FLAC, ...), else re-encoded to AAC with a warning.
- Truncation: after each pass ``VideoReader.truncation`` says whether decoding ended early (fewer frames than the
  container announces, an incomplete last frame, or a decode error part-way, at which the pass stops; the frames
  decoded before it are kept).
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


@dataclass
class VideoInfo:
    """What the pipeline needs to know about an input video (all JSON-able via ``as_dict``)."""

    path: str
    format: str  # demuxer name, e.g. 'mpeg', 'mov,mp4,m4a,3gp,3g2,mj2', 'gif'
    codec: str  # video codec name
    width: int  # upright size (after the rotation below)
    height: int
    fps: Fraction  # average frame rate
    time_base: Fraction  # video stream time base
    num_frames: int | None  # from the container when it says; None when unknown
    duration: float | None  # seconds, when known
    has_audio: bool
    audio_codec: str | None  # first audio stream
    audio_sample_rate: int | None
    rotation: int = 0  # degrees (0/90/180/270) the stored picture is turned counter-clockwise to stand upright
    coded_width: int = 0  # size as stored in the file (sideways when rotation is 90 or 270)
    coded_height: int = 0
    num_audio_streams: int = 0
    duration_source: str | None = None  # 'stream' or 'container': where ``duration`` comes from

    def as_dict(self) -> dict:
        d = asdict(self)
        d["fps"] = float(self.fps)
        d["fps_fraction"] = f"{self.fps.numerator}/{self.fps.denominator}"
        d["time_base"] = f"{self.time_base.numerator}/{self.time_base.denominator}"
        return d

    def expected_frames(self) -> tuple[int | None, str | None]:
        """Frames the container announces, and from what: (n, 'frames' | 'stream duration' | 'container duration'),
        or (None, None)."""
        if self.num_frames:
            return self.num_frames, "frames"
        if self.duration:
            return int(round(self.duration * float(self.fps))), f"{self.duration_source} duration"
        return None, None


class Frame(NamedTuple):
    """One decoded frame: running index, upright RGB uint8 [H,W,3], timestamp (stream time base), seconds."""

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
        raise KeeprError(f"{p}: not a readable video (corrupt, cut short, or not a video file: {exc.strerror})") \
            from None
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


def _rotation(stream, frame) -> int:
    """Counter-clockwise degrees (0/90/180/270) that turn the stored picture upright.

    The display matrix (side data on the decoded frame; FFmpeg's convention: counter-clockwise degrees) wins; else the
    legacy ``rotate`` tag, which says how far a player turns the picture clockwise.
    """
    deg = 0.0
    try:
        deg = float(frame.rotation or 0)
    except (AttributeError, TypeError, ValueError):
        deg = 0.0
    if not deg:
        tag = (stream.metadata or {}).get("rotate")
        try:
            deg = -float(tag) if tag else 0.0
        except ValueError:
            deg = 0.0
    return int(round(deg / 90.0)) % 4 * 90


def _upright(image: np.ndarray, rotation: int) -> np.ndarray:
    if not rotation:
        return image
    return np.ascontiguousarray(np.rot90(image, k=rotation // 90))  # np.rot90 turns counter-clockwise


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
        rotation = _rotation(stream, first)
        fps = stream.average_rate or stream.guessed_rate or stream.base_rate
        if not fps or fps <= 0:
            fps = Fraction(25, 1)
        fps = Fraction(fps)
        duration, source = None, None
        if stream.duration is not None and stream.time_base is not None:
            duration, source = float(stream.duration * stream.time_base), "stream"
        elif container.duration is not None:
            duration, source = container.duration / av.time_base, "container"
        audio = container.streams.audio[0] if container.streams.audio else None
        upright = (height, width) if rotation in (90, 270) else (width, height)
        return VideoInfo(
            path=str(path),
            format=container.format.name,
            codec=cc.name,
            width=upright[0],
            height=upright[1],
            fps=fps,
            time_base=Fraction(stream.time_base) if stream.time_base else Fraction(1, 1) / fps,
            num_frames=int(stream.frames) if stream.frames else None,
            duration=duration,
            has_audio=audio is not None,
            audio_codec=audio.codec_context.name if audio is not None else None,
            audio_sample_rate=int(audio.codec_context.sample_rate) if audio is not None else None,
            rotation=rotation,
            coded_width=width,
            coded_height=height,
            num_audio_streams=len(container.streams.audio),
            duration_source=source,
        )


class VideoReader:
    """Stream upright RGB uint8 frames of a video; each ``iter()`` is a fresh pass over the file.

    Attributes mirror ``VideoInfo``: ``fps``, ``width``, ``height`` (upright), ``rotation`` (degrees counter-clockwise
    applied to the stored picture), ``num_frames`` (None when the container does not say), ``has_audio``,
    ``time_base``, ``start_time`` (seconds of the earliest stream start, the timestamp origin ``VideoWriter`` uses).

    After a pass that ran to its end, ``truncation`` is None when the video decoded completely, else a dict
    ``{expected_frames, decoded_frames, expected_seconds, decoded_seconds, error}`` (``expected_*`` None when the
    container announces nothing usable; ``error`` a one-line cause). A decode error part-way ends the pass there
    (the frames decoded before it were yielded) instead of raising. ``decoded_frames`` is that pass's frame count.
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
        self.truncation: dict | None = None
        self.decoded_frames: int | None = None

    fps = property(lambda self: self.info.fps)
    width = property(lambda self: self.info.width)
    height = property(lambda self: self.info.height)
    rotation = property(lambda self: self.info.rotation)
    num_frames = property(lambda self: self.info.num_frames)
    has_audio = property(lambda self: self.info.has_audio)
    time_base = property(lambda self: self.info.time_base)

    def estimated_frames(self) -> int | None:
        """Frame count from the container, else duration x fps (for progress bars only)."""
        return self.info.expected_frames()[0]

    def __iter__(self) -> Iterator[Frame]:
        container = _open_input(self.path)
        cw, ch = self.info.coded_width, self.info.coded_height
        rot = self.info.rotation
        index, error, last_corrupt, last_time = 0, None, False, None
        try:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            if self.threads:
                stream.codec_context.thread_count = self.threads
            packets = container.demux(stream)
            while True:
                try:
                    packet = next(packets, None)
                    if packet is None:
                        break
                    frames = packet.decode()
                    corrupt_packet = packet.is_corrupt
                except av.error.FFmpegError as exc:
                    error = f"decoding stopped at frame {index} ({exc.strerror})"
                    frames, corrupt_packet = _drain(stream), False  # frames still buffered in the decoder
                    packets = None
                for frame in frames:
                    if frame.width != cw or frame.height != ch or frame.format.name != "rgb24":
                        frame = frame.reformat(width=cw, height=ch, format="rgb24")
                    image = _upright(frame.to_ndarray(), rot)
                    t = float(frame.pts * frame.time_base) if frame.pts is not None and frame.time_base else None
                    last_corrupt = frame.is_corrupt or corrupt_packet
                    last_time = t if t is not None else last_time
                    yield Frame(index, image, frame.pts, t)
                    index += 1
                if packets is None:
                    break
        finally:
            container.close()
        self.decoded_frames = index
        self.truncation = self._truncation(index, last_time, error, last_corrupt)

    def _truncation(self, decoded: int, last_time: float | None, error: str | None, last_corrupt: bool) -> dict | None:
        fps = float(self.fps)
        expected, source = self.info.expected_frames()
        tol = max(2, int(np.ceil(0.01 * expected))) if expected else 0
        if source == "container duration":  # may include a longer audio track: allow half a second more
            tol += int(np.ceil(0.5 * fps))
        short = expected is not None and decoded < expected - tol
        if not (short or error or last_corrupt):
            return None
        if error is None and not short:
            error = f"the last frame (#{decoded - 1}) is incomplete"
        if not short:
            expected = None  # the container's figure agrees with the decoded one (MPEG-PS guesses it from the end)
        decoded_seconds = (last_time - self.video_start + 1 / fps) if last_time is not None else decoded / fps
        return {
            "expected_frames": expected,
            "decoded_frames": decoded,
            "expected_seconds": round(expected / fps, 3) if expected is not None else None,
            "decoded_seconds": round(decoded_seconds, 3),
            "error": error,
        }

    def truncation_message(self) -> str | None:
        """One line describing ``truncation`` (None when the last pass decoded completely)."""
        tr = self.truncation
        if tr is None:
            return None
        if tr["expected_frames"] is not None:
            what = (f"decoded {tr['decoded_frames']} of {tr['expected_frames']} frames "
                    f"({tr['decoded_seconds']:.2f} of {tr['expected_seconds']:.2f} s)")
        else:
            what = f"decoded {tr['decoded_frames']} frames ({tr['decoded_seconds']:.2f} s)"
        cause = f": {tr['error']}" if tr["error"] else ""
        return f"{self.path}: video ends early, the file may be cut short or damaged; {what}{cause}"


def _drain(stream) -> list:
    """Frames still buffered in ``stream``'s decoder after an error (best effort)."""
    try:
        return list(stream.codec_context.decode(None))
    except (av.error.FFmpegError, ValueError):
        return []


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
