"""Streaming video output with PyAV: H.264 mp4 of the input's size and timestamps, the input's other streams carried.

The choices (size, rotation, timing, other streams, colour) are the module docstring of :mod:`anonymizer.video`.
:func:`check_encode_settings` opens a throw-away encoder so bad settings fail before any work.
"""
from __future__ import annotations

import os
from fractions import Fraction

import av
import numpy as np

from anonymizer.streams import AUDIO_MODES, StreamMuxer, StreamPlan, plan_streams
from keepr.errors import KeeprError

X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow",
                "placebo")


def check_encode_settings(width: int, height: int, fps: Fraction | float, crf: int = 18,
                          preset: str = "medium") -> None:
    """Fail fast, before any work, on encoder settings libx264 will not take (one-line KeeprError naming the option).

    Opens (and discards) a libx264 encoder with these settings; nothing is written anywhere.
    """
    if preset not in X264_PRESETS:
        raise KeeprError(f"encode.preset {preset!r}: not an x264 preset ({', '.join(X264_PRESETS)})")
    try:
        crf_ok = float(crf) == int(crf) and 0 <= int(crf) <= 51
    except (TypeError, ValueError):
        crf_ok = False
    if not crf_ok:
        raise KeeprError(f"encode.crf {crf!r}: must be an integer from 0 (lossless) to 51 (worst)")
    try:
        rate = Fraction(fps).limit_denominator(1_000_000)
    except (TypeError, ValueError, ZeroDivisionError):
        rate = Fraction(0)
    if rate <= 0:
        raise KeeprError(f"frame rate {fps!r}: must be positive")
    width, height = int(width), int(height)
    if width <= 0 or height <= 0:
        raise KeeprError(f"video size {width}x{height}: must be positive")
    ctx = av.CodecContext.create("libx264", "w")
    ctx.width, ctx.height = width, height
    ctx.pix_fmt = "yuv420p" if (width % 2 == 0 and height % 2 == 0) else "yuv444p"
    ctx.time_base = 1 / rate
    ctx.framerate = rate
    ctx.options = {"crf": str(int(crf)), "preset": preset}
    try:
        ctx.open()
    except (av.error.FFmpegError, ValueError) as exc:
        why = getattr(exc, "strerror", None) or str(exc)
        raise KeeprError(f"libx264 refuses crf {int(crf)}, preset {preset!r}, size {width}x{height}, "
                         f"{float(rate):.3f} fps ({why})") from None
    finally:
        del ctx


class VideoWriter:
    """Encode RGB uint8 frames to an H.264 mp4 of fixed size, carrying the input's other streams per ``plan``.

    ``plan`` (from ``anonymizer.streams.plan_streams``) says which input streams are copied, transcoded or dropped;
    without one, ``plan_streams(audio_from, audio)`` is made here (no other streams when ``audio_from`` is None).
    ``write(image, pts)`` takes the frame's presentation timestamp in ``time_base``, already relative to the output's
    origin (see ``plan_timestamps``), or None for ``index / fps``. ``start_time`` (seconds) is the input time that
    becomes 0 in the output; it is subtracted from the carried streams' timestamps so sync is kept. Call ``close()``
    (or use as a context manager) to flush. Frames are written as given (upright), with no rotation tag.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        width: int,
        height: int,
        fps: Fraction | float,
        audio_from: str | os.PathLike | None = None,
        time_base: Fraction | None = None,  # unit of the timestamps given to write(); default 1/fps
        start_time: float = 0.0,  # input time (s) mapped to output time 0; shifts the carried streams
        crf: int = 18,  # x264 quality (0 = lossless, 18 ~ visually lossless)
        preset: str = "medium",  # x264 speed/size trade-off
        audio: str = "copy",  # 'copy' | 'aac' | 'none' (used only when no plan is given)
        threads: int = 2,  # x264 threads: fixed, so the bitstream is the same on every machine (0 = x264 decides)
        plan: StreamPlan | None = None,
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
        self._muxer = None
        if plan is None and audio_from is not None:
            plan = plan_streams(audio_from, audio)
        self.plan = plan
        try:
            self.container = av.open(self.path, mode="w", format="mp4")
        except (av.error.FFmpegError, OSError) as exc:
            raise KeeprError(f"{self.path}: cannot create output video ({exc})") from None
        try:
            self.stream = self.container.add_stream("libx264", rate=self.fps)
            self.stream.width, self.stream.height = self.width, self.height
            self.stream.pix_fmt = self.pix_fmt
            self.stream.codec_context.time_base = self.time_base
            self.stream.options = {"crf": str(int(crf)), "preset": preset, "threads": str(int(threads))}
            self.stream.codec_context.open()  # the video encoder first, so its errors are not blamed on audio
        except (av.error.FFmpegError, ValueError) as exc:
            self._abort()
            why = getattr(exc, "strerror", None) or str(exc)
            raise KeeprError(f"{self.path}: libx264 refuses crf {crf!r}, preset {preset!r}, size "
                             f"{self.width}x{self.height} ({why})") from None
        try:
            if plan is not None and plan.kept:
                self._muxer = StreamMuxer(plan, self.start_time)
                self._muxer.add_streams(self.container)
            self.container.start_encoding()
        except KeeprError:
            self._abort()
            raise
        except (av.error.FFmpegError, ValueError) as exc:
            self._abort()
            why = getattr(exc, "strerror", None) or str(exc)
            kept = ", ".join(f"#{a.index} {a.codec} ({a.action})" for a in plan.kept) if plan is not None else ""
            if kept:
                raise KeeprError(f"{self.path}: cannot start the output with the input's streams {kept} ({why}); "
                                 "use audio 'aac' to re-encode the audio or 'none' to drop it") from None
            raise KeeprError(f"{self.path}: cannot start the output video ({why})") from None

    def _mux_until(self, t: float | None) -> None:
        if self._muxer is None:
            return
        try:
            self._muxer.mux_until(t)
        except (av.error.FFmpegError, ValueError) as exc:
            raise KeeprError(f"{self.path}: cannot write the input's other streams "
                             f"({getattr(exc, 'strerror', None) or exc}); use audio 'none' to drop the audio") from None

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
        self._mux_until(float(pts * self.time_base))
        try:
            for packet in self.stream.encode(frame):
                self.container.mux(packet)
        except av.error.FFmpegError as exc:
            raise KeeprError(f"{self.path}: encoding frame {self.frames_written} failed ({exc.strerror})") from None
        self.frames_written += 1

    def close(self) -> None:
        """Flush the encoder, carry the remaining packets of the other streams and finish the file."""
        if self._closed:
            return
        self._closed = True
        try:
            try:
                for packet in self.stream.encode(None):
                    self.container.mux(packet)
            except av.error.FFmpegError as exc:
                raise KeeprError(f"{self.path}: flushing the video encoder failed ({exc.strerror})") from None
            if self._muxer is not None:
                try:
                    self._muxer.finish()
                except (av.error.FFmpegError, ValueError) as exc:
                    raise KeeprError(f"{self.path}: cannot write the input's other streams "
                                     f"({getattr(exc, 'strerror', None) or exc}); use audio 'none' to drop the "
                                     "audio") from None
            try:
                self.container.close()
            except av.error.FFmpegError as exc:
                raise KeeprError(f"{self.path}: cannot finish the output file ({exc.strerror})") from None
        finally:
            self._abort()

    def audio_summary(self) -> dict | None:
        """The first kept audio stream: None (no audio) or {'mode': 'copy'|'aac', 'codec': input codec}."""
        return self.plan.audio_summary() if self.plan is not None else None

    def _abort(self) -> None:
        self._closed = True
        for c in (getattr(self, "container", None), getattr(self, "_muxer", None)):
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
