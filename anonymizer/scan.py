"""Pass 1: find every face of a video and follow each person through it.

:func:`track_faces` decodes the video once, frame by frame (memory bounded by a few numbers per frame and one image
per track), and

1. runs the tracking detector every ``detect.every`` frames and feeds :class:`anonymizer.tracking.FaceTracker`;
2. runs the coverage detector (at least as sensitive: ``coverage.upsample`` >= ``detect.upsample``) on every frame,
   reusing the tracking detections where the two detectors are the same; these faces are what the render pass
   must anonymize or report (:mod:`anonymizer.coverage`);
3. after the pass, lets each track reach back to the person's first detectable frame and forward to the last over
   the coverage detections (:func:`anonymizer.tracking.extend_track`), and links tracks of one person into a
   :class:`anonymizer.persons.Person` (identity descriptors, no overlap in time).

The result, a :class:`Scan`, is what the web page shows ("faces found") and what :func:`anonymizer.render.render`
works from.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from anonymizer.persons import Person, link_persons
from anonymizer.settings import InferSettings
from anonymizer.tracking import FaceTracker, Track, extend_track, iou
from anonymizer.video import VideoReader
from keepr.errors import KeeprError

Progress = Callable[[str, int, "int | None"], None]  # (stage, frames done, frames expected or None)


class Cancelled(KeeprError):
    """The caller's cancel check asked to stop."""


class Stopwatch:
    """Accumulates seconds per stage (for the report and bench/infer.py)."""

    def __init__(self):
        self.total: dict[str, float] = {}
        self.count: dict[str, int] = {}

    def add(self, stage: str, seconds: float, n: int = 1) -> None:
        self.total[stage] = self.total.get(stage, 0.0) + seconds
        self.count[stage] = self.count.get(stage, 0) + n

    def summary(self) -> dict:
        return {k: {"seconds": round(v, 4), "items": self.count[k],
                    "per_second": round(self.count[k] / v, 2) if v > 0 else None} for k, v in self.total.items()}


@dataclass
class Scan:
    """What pass 1 found in a video."""

    video: str
    num_frames: int
    stamps: list[tuple[float | None, int | None]]  # per frame (seconds, pts)
    persons: list[Person]  # sorted by prominence (size x duration), ids 0, 1, ...
    faces: list[list[tuple]]  # per frame: (x0, y0, x1, y1, score) of every face the coverage pass found
    frames_report: list[dict]
    rejected: list[Track] = field(default_factory=list)  # tracks too short to swap (their faces get the fallback)
    detector: dict = field(default_factory=dict)  # tracking and coverage detector settings
    smallest_face: float | None = None  # smallest face side found (px), for the "no face" advice
    truncation: dict | None = None  # from the reader (None: decoded completely)
    extended: int = 0  # detections added to tracks from the coverage pass
    loose: int = 0  # face boxes added between detections of faces that no person's track holds


def _merge_faces(coverage: list, tracking: list | None) -> list[tuple]:
    """Coverage faces plus tracking faces the coverage detector missed, as (x0, y0, x1, y1, score) tuples."""
    out = [(*(float(v) for v in f.box), float(f.score)) for f in coverage]
    for f in tracking or []:
        if all(iou(f.box, o[:4]) < 0.3 for o in out):
            out.append((*(float(v) for v in f.box), float(f.score)))
    return out


def track_faces(video: str | VideoReader, settings: InferSettings, recognizer=None, progress: Progress | None = None,
                cancel: Callable[[], bool] | None = None, watch: Stopwatch | None = None) -> Scan:
    """Pass 1 over ``video`` (see the module docstring). ``recognizer`` (an ``anonymizer.identity.FaceRecognizer``)
    links tracks into persons by identity; without it only tracks that the tracker itself linked form a person.
    ``progress`` is called after each frame; ``cancel`` is polled and stops the pass with :class:`Cancelled`."""
    from anonymizer.faces import detect_faces  # heavy (torch): only in track_faces()

    s = settings
    reader = video if isinstance(video, VideoReader) else VideoReader(video)
    watch = watch or Stopwatch()
    d, t = s.detect, s.track
    cov_detector, cov_upsample = s.coverage_detector()
    same = cov_detector == d.detector and cov_upsample == d.upsample
    tracker = FaceTracker(iou_threshold=t.iou_threshold, max_age=t.max_age, link_distance=t.link_distance,
                          min_detections=t.min_detections)
    stamps, faces, frames_report = [], [], []
    smallest = None
    total = reader.estimated_frames()
    t_dec = time.perf_counter()
    for f in reader:
        now = time.perf_counter()
        watch.add("decode", now - t_dec)
        if cancel is not None and cancel():
            raise Cancelled(f"{reader.path}: cancelled")
        stamps.append((f.time, f.pts))
        rec = {"index": f.index, "time": None if f.time is None else round(f.time, 5), "detected": None,
               "timing_ms": {"decode": round((now - t_dec) * 1e3, 2)}}
        found = None
        if f.index % d.every == 0:
            t0 = time.perf_counter()
            found = detect_faces(f.image, d.detector, d.upsample, d.min_size, d.max_side)
            dt = time.perf_counter() - t0
            watch.add("detect", dt)
            rec["detected"] = len(found)
            rec["timing_ms"]["detect"] = round(dt * 1e3, 2)
        if same and found is not None:
            cov = found
        else:
            t0 = time.perf_counter()
            cov = detect_faces(f.image, cov_detector, cov_upsample, 0, d.max_side)
            dt = time.perf_counter() - t0
            watch.add("coverage_detect", dt)
            rec["timing_ms"]["coverage_detect"] = round(dt * 1e3, 2)
        frame_faces = _merge_faces(cov, found)
        faces.append(frame_faces)
        rec["faces_seen"] = len(frame_faces)
        for fb in frame_faces:
            side = min(fb[2] - fb[0], fb[3] - fb[1])
            smallest = side if smallest is None else min(smallest, side)
        t0 = time.perf_counter()
        tracker.update(f.index, found, image=f.image)
        watch.add("track", time.perf_counter() - t0)
        frames_report.append(rec)
        if progress is not None:
            progress("track", f.index + 1, total)
        t_dec = time.perf_counter()

    t0 = time.perf_counter()
    tracks = tracker.finish()
    extended = 0
    if s.coverage.extend_tracks and tracks:
        # A coverage face already matching a detection of some track belongs to it.
        claimed = set()
        for tr in tracks:
            for i, (box, _) in tr.detections.items():
                for k, fb in enumerate(faces[i]):
                    if iou(fb[:4], box) >= 0.5:
                        claimed.add((i, k))
        for tr in tracks:
            extended += extend_track(tr, faces, claimed, t.iou_threshold, max_miss=max(2, d.every))
    watch.add("track", time.perf_counter() - t0, 0)
    loose = _fill_loose_faces(faces, tracks, s)
    t0 = time.perf_counter()
    persons = link_persons(tracks, recognizer, t.link_identity)
    watch.add("link_persons", time.perf_counter() - t0, 0)
    return Scan(video=reader.path, num_frames=len(stamps), stamps=stamps, persons=persons, faces=faces,
                frames_report=frames_report, rejected=list(tracker.rejected),
                detector={"tracking": {"detector": d.detector, "upsample": d.upsample, "every": d.every},
                          "coverage": {"detector": cov_detector, "upsample": cov_upsample, "every": 1}},
                smallest_face=smallest, truncation=reader.truncation, extended=extended, loose=loose)


def _fill_loose_faces(faces: list[list[tuple]], tracks: list[Track], s: InferSettings) -> int:
    """Faces the coverage pass found outside every person's track are followed on their own, and their boxes
    between detections (interpolated, held) are added to ``faces`` marked as inferred, so the fallback covers such
    a face steadily instead of only in the frames where the detector happened to find it. Returns boxes added."""
    t = s.track
    taken = set()
    for tr in tracks:
        for tb in tr.timeline(len(faces), t.max_gap, t.hold, 0):
            if tb.box is not None:
                taken.update((tb.index, k) for k, fb in enumerate(faces[tb.index]) if iou(fb[:4], tb.box) >= 0.3)
    loose = FaceTracker(iou_threshold=t.iou_threshold, max_age=t.max_age, link_distance=t.link_distance,
                        min_detections=1, keep_images=False)

    class _Box:
        def __init__(self, f):
            self.box, self.score = f[:4], f[4]

    for i, fs in enumerate(faces):
        loose.update(i, [_Box(f) for k, f in enumerate(fs) if (i, k) not in taken])
    added = 0
    for tr in loose.finish():
        for tb in tr.timeline(len(faces), t.max_gap, t.hold, 0):
            if tb.status in ("interpolated", "held") and all(iou(f[:4], tb.box) < 0.3 for f in faces[tb.index]):
                faces[tb.index].append((*tb.box, 0.0, True))
                added += 1
    return added


def no_face_message(scan: Scan, settings: InferSettings) -> str:
    """Why no person was found, with advice only where it applies."""
    d = settings.detect
    seen = sum(1 for fs in scan.faces if fs)
    if seen:
        side = int(scan.smallest_face or 0)
        return (f"{scan.video}: no face could be tracked (detector {d.detector}, upsample {d.upsample}); the coverage "
                f"detector ({scan.detector['coverage']['detector']}, upsample "
                f"{scan.detector['coverage']['upsample']}) saw faces down to {side} px in {seen} frame(s): "
                f"use --detect.upsample {scan.detector['coverage']['upsample']}")
    return (f"{scan.video}: no face found in any of {scan.num_frames} frame(s) (detector {d.detector}, upsample "
            f"{d.upsample}; coverage detector {scan.detector['coverage']['detector']}, upsample "
            f"{scan.detector['coverage']['upsample']})")
