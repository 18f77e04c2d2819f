"""What happens to each stream of the input when the anonymized mp4 is written, decided before any work.

``plan_streams(source, audio)`` looks at every stream of the input and returns a ``StreamPlan`` that lists, for each
one, its action:

- ``encode``: the first video stream (the one that is anonymized), re-encoded to H.264.
- ``copy``: packets remuxed unchanged (audio in a codec that mp4 holds and players play, mov_text subtitles).
- ``transcode``: re-encoded (audio to AAC: always with ``audio="aac"``, and with ``audio="copy"`` when mp4 cannot
  hold the codec, e.g. PCM; text subtitles such as SubRip / ASS / WebVTT to mov_text, the only text format of mp4).
- ``drop``: not carried, with the reason (``audio="none"``, other video streams, which would show faces unchanged,
  bitmap subtitles, data streams such as timecode or GPS telemetry, attachments such as fonts or cover art, codecs
  without a decoder).

Every stream that is not copied or encoded as asked has a one-line ``warning``. ``StreamPlan.as_list()`` is the
JSON-able list for report.json. Copying is checked for real: the copied streams' first packets are muxed into a
throw-away in-memory mp4 (header, packets, trailer); a stream the muxer refuses is transcoded instead.

``StreamMuxer`` carries out the plan for ``anonymizer.video_writer.VideoWriter``: it demuxes the kept streams of the
input in file order, alongside the video being written, so memory stays bounded.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from fractions import Fraction

import av

from keepr.errors import KeeprError

AUDIO_MODES = ("copy", "aac", "none")
# Audio codecs copied into mp4 unchanged: what the mp4 muxer takes AND common players play. PCM is refused on purpose:
# FFmpeg writes it as ISO 'ipcm', which browsers and QuickTime do not play; it is re-encoded to AAC instead.
MP4_AUDIO = ("aac", "mp3", "mp2", "ac3", "eac3", "opus", "flac", "alac")
MP4_SUBTITLES = ("mov_text",)
# Text subtitle codecs converted to mov_text (decoded to ASS events and re-encoded); names as FFmpeg reports them.
TEXT_SUBTITLES = ("subrip", "srt", "ass", "ssa", "webvtt", "text")
CHANNEL_LAYOUTS = {1: "mono", 2: "stereo", 3: "2.1", 4: "quad", 5: "5.0", 6: "5.1", 7: "6.1", 8: "7.1"}
_PROBE_PACKETS = 4  # packets per copied stream muxed into the throw-away mp4
_PROBE_READ_LIMIT = 2000  # packets read at most while looking for them


@dataclass
class StreamAction:
    """What happens to one input stream (see the module docstring for the actions)."""

    index: int  # input stream index
    type: str  # 'video' | 'audio' | 'subtitle' | 'data' | 'attachment' | ...
    codec: str | None
    action: str  # 'encode' | 'copy' | 'transcode' | 'drop'
    to: str | None = None  # output codec for encode/transcode
    reason: str | None = None  # why it is transcoded or dropped
    warning: str | None = None  # one line for the user when the stream is not carried as it is
    language: str | None = None

    def as_dict(self) -> dict:
        d = {"index": self.index, "type": self.type, "codec": self.codec, "action": self.action}
        for k in ("to", "reason", "warning", "language"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        return d


@dataclass
class StreamPlan:
    """The decision for every stream of ``source`` (``streams`` in input order)."""

    source: str
    audio: str  # the audio mode asked for
    streams: list[StreamAction] = field(default_factory=list)

    @property
    def kept(self) -> list[StreamAction]:
        """Streams other than the video that go into the output (copied or transcoded)."""
        return [s for s in self.streams if s.action in ("copy", "transcode")]

    @property
    def warnings(self) -> list[str]:
        return [s.warning for s in self.streams if s.warning]

    def as_list(self) -> list[dict]:
        return [s.as_dict() for s in self.streams]

    def audio_summary(self) -> dict | None:
        """The first kept audio stream as {'mode': 'copy'|'aac', 'codec': input codec}, None when no audio is kept."""
        for s in self.kept:
            if s.type == "audio":
                return {"mode": "copy" if s.action == "copy" else "aac", "codec": s.codec}
        return None


def _source_path(source) -> str:
    return str(getattr(source, "path", source))


def _open(path: str):
    try:
        return av.open(path, mode="r")
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise KeeprError(f"{path}: cannot open to plan its streams ({getattr(exc, 'strerror', None) or exc})") from None


def _codec_name(stream) -> str | None:
    """The codec's canonical name (e.g. 'subrip', 'ass', 'mp3'; decoders may be called 'srt', 'ssa', 'mp3float')."""
    cc = stream.codec_context
    if cc is None:
        return None
    try:
        return cc.codec.canonical_name or cc.name
    except Exception:  # noqa: BLE001 - no codec
        return cc.name or None


def _has_decoder(stream) -> bool:
    try:
        return stream.codec_context is not None and stream.codec_context.codec is not None \
            and stream.codec_context.codec.is_decoder
    except Exception:  # noqa: BLE001 - unknown codec
        return False


def plan_streams(source, audio: str = "copy") -> StreamPlan:
    """Decide, before any work, what happens to every stream of ``source`` (a path, or a VideoReader / VideoInfo).

    ``audio``: 'copy' keeps every audio stream, copied when mp4 can hold it, else transcoded to AAC with a warning;
    'aac' transcodes every audio stream to AAC; 'none' drops all audio. Raises KeeprError for a bad mode.
    """
    if audio not in AUDIO_MODES:
        raise KeeprError(f"encode.audio must be one of {', '.join(AUDIO_MODES)}; got {audio!r}")
    path = _source_path(source)
    plan = StreamPlan(source=path, audio=audio)
    with _open(path) as c:
        video_index = c.streams.video[0].index if c.streams.video else None
        for s in c.streams:
            codec = _codec_name(s)
            lang = s.metadata.get("language") if s.metadata else None
            a = StreamAction(index=s.index, type=s.type, codec=codec, action="drop",
                             language=lang if lang and lang != "und" else None)
            if s.index == video_index:
                a.action, a.to = "encode", "h264"
            elif s.type == "video":
                if s.disposition & av.stream.Disposition.attached_pic:
                    a.reason = "attached picture (cover art) is not carried"
                else:
                    a.reason = "only the first video stream is anonymized; another one could show faces unchanged"
            elif s.type == "audio":
                if audio == "none":
                    a.reason = "dropped by request (audio 'none')"
                elif audio == "copy" and codec in MP4_AUDIO:
                    a.action = "copy"
                elif not _has_decoder(s):
                    a.reason = f"no decoder for {codec or 'this codec'}, cannot re-encode it to AAC"
                else:
                    a.action, a.to = "transcode", "aac"
                    if audio == "copy":
                        a.reason = f"mp4 cannot hold {codec} playably"
            elif s.type == "subtitle":
                if codec in MP4_SUBTITLES:
                    a.action = "copy"
                elif codec in TEXT_SUBTITLES and _has_decoder(s):
                    a.action, a.to = "transcode", "mov_text"
                    a.reason = f"mp4 holds text subtitles as mov_text, not {codec}"
                else:
                    a.reason = f"mp4 cannot hold {codec or 'these'} subtitles (only text subtitles are carried)"
            elif s.type == "data":
                a.reason = "data streams (timecode, telemetry, ...) are not carried"
            elif s.type == "attachment":
                a.reason = "attachments (fonts, pictures) are not carried in mp4"
            else:
                a.reason = f"{s.type} streams are not carried"
            plan.streams.append(a)
        has_decoder = {s.index: _has_decoder(s) for s in c.streams}
    _check_copies(path, plan, has_decoder)
    for a in plan.streams:
        name = f"{a.type} stream #{a.index} ({a.codec or 'unknown codec'})"
        if a.action == "drop":
            a.warning = f"{name} dropped: {a.reason}"
        elif a.action == "transcode" and not (a.type == "audio" and audio == "aac"):
            a.warning = f"{name} re-encoded to {a.to}: {a.reason}"
    return plan


def _trial_mux(path: str, indices: list[int]) -> str | None:
    """Mux the first packets of the input streams ``indices`` into a throw-away in-memory mp4 (header, packets,
    trailer). Returns the muxer's error, or None when it took them."""
    with _open(path) as container:
        by_index = {s.index: s for s in container.streams}
        streams = [by_index[i] for i in indices]
        packets = {i: [] for i in indices}
        try:
            for n, p in enumerate(container.demux(streams)):
                got = packets[p.stream.index]
                if p.size and (p.pts is not None or p.dts is not None) and len(got) < _PROBE_PACKETS:
                    got.append(p)
                if n >= _PROBE_READ_LIMIT or all(len(v) >= _PROBE_PACKETS for v in packets.values()):
                    break
        except av.error.FFmpegError:
            pass  # a damaged input: mux what was read
        try:
            with av.open(io.BytesIO(), mode="w", format="mp4") as out:
                outs = {s.index: out.add_stream_from_template(s) for s in streams}
                out.start_encoding()
                for i in indices:
                    first = next((p.dts for p in packets[i] if p.dts is not None), 0)
                    for p in packets[i]:
                        if p.pts is not None:
                            p.pts -= first
                        if p.dts is not None:
                            p.dts -= first
                        p.stream = outs[i]
                        out.mux(p)
            return None
        except (av.error.FFmpegError, ValueError) as exc:
            return getattr(exc, "strerror", None) or str(exc)


def _check_copies(path: str, plan: StreamPlan, has_decoder: dict[int, bool]) -> None:
    """Downgrade planned copies that the mp4 muxer refuses: audio to a transcode, anything else to a drop."""
    copies = [a for a in plan.streams if a.action == "copy"]
    if not copies or _trial_mux(path, [a.index for a in copies]) is None:
        return
    for a in copies:  # find the culprit(s)
        why = _trial_mux(path, [a.index])
        if why is None:
            continue
        if a.type == "audio" and has_decoder[a.index]:
            a.action, a.to, a.reason = "transcode", "aac", f"mp4 cannot hold {a.codec} ({why})"
        else:
            a.action, a.reason = "drop", f"mp4 cannot hold {a.codec} ({why})"


# ----------------------------------------------------------------------------------------------------------------
# Carrying out a plan.

class _Kept:
    """One kept input stream and how its packets reach the output."""

    def __init__(self, action: StreamAction, stream_in, out, start_time: float):
        self.action, self.stream_in, self.out = action, stream_in, out
        self.tb = stream_in.time_base
        self.offset = int(round(Fraction(start_time).limit_denominator(1_000_000) / self.tb)) if self.tb else 0
        self.start_time = start_time
        self.resampler = None
        self.next_pts = None
        self.rate = None
        self.skipped = 0  # packets that could not be decoded (transcoded streams)


class StreamMuxer:
    """Adds the plan's kept streams to an output container and muxes them alongside the video.

    Call ``add_streams(container)`` before the output's header is written, then ``mux_until(t)`` before each video
    frame at output time ``t`` (s), and ``finish()`` after the last frame; ``close()`` releases the input.
    ``start_time`` (s): the input time that becomes 0 in the output (subtracted from every timestamp).
    """

    def __init__(self, plan: StreamPlan, start_time: float = 0.0):
        self.plan = plan
        self.start_time = float(start_time)
        self.input = None
        self.kept: dict[int, _Kept] = {}
        self._packets = None
        self._pending = None
        self.container = None

    def add_streams(self, container) -> None:
        self.container = container
        if not self.plan.kept:
            return
        self.input = _open(self.plan.source)
        by_index = {s.index: s for s in self.input.streams}
        for a in self.plan.kept:
            s = by_index[a.index]
            if a.action == "copy":
                out = container.add_stream_from_template(s)
            elif a.type == "audio":
                cc = s.codec_context
                rate = cc.sample_rate or 44100
                channels = cc.layout.nb_channels if cc.layout else 2
                layout = CHANNEL_LAYOUTS.get(channels, "stereo")
                out = container.add_stream("aac", rate=rate)
                out.layout, out.format = layout, "fltp"
            else:  # text subtitles -> mov_text
                dec = s.codec_context
                dec.open(strict=False)
                out = container.add_stream("mov_text")
                out.codec_context.time_base = s.time_base
                out.codec_context.subtitle_header = dec.subtitle_header  # FFmpeg's text decoders make an ASS header
            if a.language:
                out.metadata["language"] = a.language
            k = _Kept(a, s, out, self.start_time)
            if a.action == "transcode" and a.type == "audio":
                k.rate = rate
                k.resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate)
            self.kept[a.index] = k
        self._packets = (p for p in self.input.demux([k.stream_in for k in self.kept.values()]))

    def _time(self, p) -> float | None:
        ts = p.pts if p.pts is not None else p.dts
        if ts is None or p.time_base is None:
            return None
        return float(ts * p.time_base) - self.start_time

    def mux_until(self, t: float | None) -> None:
        """Mux input packets whose time is <= ``t`` s of output time (everything left when ``t`` is None)."""
        while self._packets is not None:
            p = self._pending if self._pending is not None else next(self._packets, None)
            self._pending = None
            if p is None:
                self._packets = None
                return
            pt = self._time(p)
            if t is not None and pt is not None and pt > t:
                self._pending = p
                return
            self._handle(self.kept[p.stream.index], p)

    def _handle(self, k: _Kept, p) -> None:
        if k.action.action == "copy":
            if not p.size or (p.pts is None and p.dts is None):
                return  # demuxer flush packet
            if p.pts is not None:
                p.pts -= k.offset
            if p.dts is not None:
                p.dts -= k.offset
            p.stream = k.out
            self.container.mux(p)
        elif k.action.type == "audio":
            try:
                frames = p.decode()
            except av.error.FFmpegError:
                k.skipped += 1  # a damaged packet: skipped, as ffmpeg does
                return
            for frame in frames:
                self._encode_audio(k, frame)
        else:
            if not p.size or p.pts is None:
                return
            try:
                subs = k.stream_in.codec_context.decode2(p)
                q = k.out.codec_context.encode_subtitle(subs) if subs is not None and len(subs) else None
            except av.error.FFmpegError:
                q = None
            if q is None:
                k.skipped += 1
                return
            q.stream = k.out
            q.time_base = p.time_base
            q.pts = q.dts = p.pts - k.offset
            q.duration = p.duration
            self.container.mux(q)

    def _encode_audio(self, k: _Kept, frame) -> None:
        if k.next_pts is None:  # keep the audio's start offset relative to the video
            t0 = frame.time - self.start_time if frame is not None and frame.time is not None else 0.0
            k.next_pts = max(0, int(round(t0 * k.rate)))
        for rf in k.resampler.resample(frame):
            rf.pts = k.next_pts
            rf.time_base = Fraction(1, k.rate)
            k.next_pts += rf.samples
            for q in k.out.encode(rf):
                self.container.mux(q)

    def finish(self) -> None:
        """Mux everything left and flush the audio encoders."""
        self.mux_until(None)
        for k in self.kept.values():
            if k.resampler is not None:
                try:
                    for frame in k.stream_in.codec_context.decode(None):
                        self._encode_audio(k, frame)
                except av.error.FFmpegError:
                    pass
                self._encode_audio(k, None)
                for q in k.out.encode(None):
                    self.container.mux(q)

    def close(self) -> None:
        if self.input is not None:
            try:
                self.input.close()
            finally:
                self.input = None
