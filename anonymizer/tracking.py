"""Follow faces over the frames of a video and give one smooth crop box per frame for each followed face.

``FaceTracker`` is fed the detections of each frame in order (``update``); it associates them with existing tracks by
box overlap (greedy, highest IoU first), starts a new track for every unmatched detection, and keeps per track only a
box and score per frame plus its best frame (sharpest frontal view) for building the virtual face. Memory per frame is
a few numbers, never an image.

``finish()`` closes the tracks, links a track to an earlier one that ended before it started near the same place
(a face lost for a while and found again), and returns ``Track`` objects. ``Track.timeline(num_frames)`` gives, for
every frame of the video, a ``TrackedBox`` with a status:

- ``detected``     the detector found the face in this frame;
- ``interpolated`` not detected (detection skipped with ``detect_every > 1``, or a miss) but detected within
                   ``max_gap`` frames on both sides: the box is linearly interpolated;
- ``held``         within ``hold`` frames after the last (or before the first) detection of a segment: the nearest
                   detected box is kept (the documented choice for a lost face);
- ``lost``         further away from any detection: the frame is passed through unchanged and reported.

Boxes of detected/interpolated/held frames are then smoothed by a centred moving average over ``2 * radius + 1``
frames (centre x, centre y, width, height separately; the window shrinks at segment ends and never crosses lost
frames), which removes detector jitter without lag. Because ``infer`` makes two passes over the video (track, then
swap), the look-ahead costs no memory beyond these few numbers per frame.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from anonymizer import landmarks as L

STATUSES = ("detected", "interpolated", "held", "lost")


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two boxes (x0, y0, x1, y1)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def frontalness(landmarks: np.ndarray | None) -> float:
    """1 for a frontal face, towards 0 for a profile: symmetry of the nose tip between the outer eye corners."""
    if landmarks is None:
        return 0.5
    lm = np.asarray(landmarks, dtype=np.float64)
    nose, eye_r, eye_l = lm[L.NOSE_TIP], lm[L.EYE_RIGHT_OUTER], lm[L.EYE_LEFT_OUTER]
    d_r, d_l = np.hypot(*(nose - eye_r)), np.hypot(*(nose - eye_l))
    return float(1.0 - abs(d_r - d_l) / max(d_r + d_l, 1e-6))


@dataclass
class TrackedBox:
    """The box of one track in one frame: ``box`` (smoothed, float x0,y0,x1,y1) or None when lost; ``raw`` the
    detector's box when detected; ``score`` the detector's score when detected."""

    index: int
    status: str
    box: tuple[float, float, float, float] | None
    raw: tuple[float, float, float, float] | None = None
    score: float | None = None

    def as_dict(self) -> dict:
        r = lambda b: None if b is None else [round(float(v), 2) for v in b]  # noqa: E731
        return {"status": self.status, "box": r(self.box), "raw": r(self.raw),
                "score": None if self.score is None else round(float(self.score), 4)}


@dataclass
class Track:
    """One followed face: per-frame detections (frame -> (box, score)) and its best frame."""

    id: int
    detections: dict[int, tuple[tuple[float, float, float, float], float]] = field(default_factory=dict)
    best_index: int = -1  # frame of the best view (largest frontal face)
    best_quality: float = -1.0
    best_landmarks: np.ndarray | None = None
    best_box: tuple[float, float, float, float] | None = None
    best_image: np.ndarray | None = None  # that frame around the face (4x the box), when given images
    best_offset: tuple[int, int] = (0, 0)  # (x, y) of best_image's top-left corner in the frame
    last_index: int = -1
    config: dict = field(default_factory=dict)

    @property
    def first_index(self) -> int:
        return min(self.detections) if self.detections else -1

    @property
    def last_box(self):
        return self.detections[self.last_index][0]

    @property
    def prominence(self) -> float:
        """Sum of box areas over detected frames: large and long-lived faces first."""
        return float(sum((b[2] - b[0]) * (b[3] - b[1]) for b, _ in self.detections.values()))

    def observe(self, index, box, score, landmarks=None, image=None):
        self.detections[index] = (tuple(float(v) for v in box), float(score))
        self.last_index = max(self.last_index, index)
        area = (box[2] - box[0]) * (box[3] - box[1])
        quality = area * frontalness(landmarks) ** 2
        if quality > self.best_quality:
            self.best_quality, self.best_index = quality, index
            self.best_landmarks = None if landmarks is None else np.array(landmarks, dtype=np.float64)
            self.best_box = tuple(float(v) for v in box)
            self.best_image, self.best_offset = (None, (0, 0)) if image is None else _around(image, box)

    def add_detection(self, index: int, box, score: float) -> None:
        """Record a detection that does not compete for the best frame (e.g. one found by the coverage pass)."""
        self.detections[index] = (tuple(float(v) for v in box), float(score))
        self.last_index = max(self.last_index, index)

    def merge(self, other: "Track") -> None:
        """Absorb a later, non-overlapping track of the same face."""
        self.detections.update(other.detections)
        self.last_index = max(self.last_index, other.last_index)
        if other.best_quality > self.best_quality:
            self.best_quality, self.best_index = other.best_quality, other.best_index
            self.best_landmarks, self.best_box = other.best_landmarks, other.best_box
            self.best_image, self.best_offset = other.best_image, other.best_offset

    def timeline(self, num_frames: int, max_gap: int = 10, hold: int = 5, radius: int = 2) -> list[TrackedBox]:
        """One ``TrackedBox`` per frame 0..num_frames-1 (see the module docstring for the statuses)."""
        n = int(num_frames)
        status = ["lost"] * n
        boxes = np.full((n, 4), np.nan)
        det = sorted(i for i in self.detections if 0 <= i < n)
        for i in det:
            status[i] = "detected"
            boxes[i] = self.detections[i][0]
        # Gaps between consecutive detections: interpolate short ones, hold both ends of long ones.
        for a, b in zip(det[:-1], det[1:]):
            gap = b - a - 1
            if gap <= 0:
                continue
            if gap <= max_gap:
                for i in range(a + 1, b):
                    t = (i - a) / (b - a)
                    boxes[i] = (1 - t) * boxes[a] + t * boxes[b]
                    status[i] = "interpolated"
            else:
                for i in range(a + 1, min(a + hold, b - 1) + 1):
                    boxes[i], status[i] = boxes[a], "held"
                for i in range(max(b - hold, a + 1), b):
                    if status[i] == "lost":
                        boxes[i], status[i] = boxes[b], "held"
        if det:
            for i in range(max(0, det[0] - hold), det[0]):
                boxes[i], status[i] = boxes[det[0]], "held"
            for i in range(det[-1] + 1, min(n, det[-1] + hold + 1)):
                boxes[i], status[i] = boxes[det[-1]], "held"
        smoothed = smooth_boxes(boxes, radius)
        out = []
        for i in range(n):
            d = self.detections.get(i)
            box = None if status[i] == "lost" else tuple(float(v) for v in smoothed[i])
            out.append(TrackedBox(i, status[i], box, d[0] if d else None, d[1] if d else None))
        return out


def _around(image: np.ndarray, box, margin: float = 1.5) -> tuple[np.ndarray, tuple[int, int]]:
    """A copy of ``image`` around ``box`` (``margin`` box sides added on each side, clipped) and its offset.

    Keeping this instead of the whole frame bounds the memory of a track; FFHQ alignment and the co-part source
    crop need about 1 box side around the face.
    """
    h, w = image.shape[:2]
    bw, bh = box[2] - box[0], box[3] - box[1]
    x0, y0 = max(0, int(np.floor(box[0] - margin * bw))), max(0, int(np.floor(box[1] - margin * bh)))
    x1, y1 = min(w, int(np.ceil(box[2] + margin * bw))), min(h, int(np.ceil(box[3] + margin * bh)))
    return np.array(image[y0:y1, x0:x1], copy=True), (x0, y0)


def smooth_boxes(boxes: np.ndarray, radius: int) -> np.ndarray:
    """Centred moving average of boxes [N,4] (NaN rows = lost) on (cx, cy, w, h), per run of non-NaN rows."""
    boxes = np.asarray(boxes, dtype=np.float64)
    out = boxes.copy()
    if radius <= 0 or len(boxes) == 0:
        return out
    valid = ~np.isnan(boxes[:, 0])
    cwh = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2,
                    boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], axis=1)
    i, n = 0, len(boxes)
    while i < n:
        if not valid[i]:
            i += 1
            continue
        j = i
        while j < n and valid[j]:
            j += 1
        seg = cwh[i:j]
        csum = np.vstack([np.zeros((1, 4)), np.cumsum(seg, axis=0)])
        for k in range(j - i):
            lo, hi = max(0, k - radius), min(j - i, k + radius + 1)
            cx, cy, w, h = (csum[hi] - csum[lo]) / (hi - lo)
            out[i + k] = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
        i = j
    return out


class FaceTracker:
    """Associate per-frame face detections into tracks (see the module docstring).

    iou_threshold: least IoU between a detection and a track's last box to continue that track.
    max_age:       frames a track may go undetected and still be continued by an overlapping detection.
    link_distance: after tracking, a track that starts after another ended is merged into it when its first box
                   centre lies within ``link_distance`` x (box size) of the other's last box centre.
    min_detections: tracks with fewer detected frames are dropped as false positives (at most the number of frames
                   the detector ran on is asked for, so a face in a one-frame clip is kept).
    keep_images:   keep a copy of each track's best frame (needed to build the virtual face).
    """

    def __init__(self, iou_threshold: float = 0.3, max_age: int = 25, link_distance: float = 1.0,
                 min_detections: int = 2, keep_images: bool = True):
        self.iou_threshold = float(iou_threshold)
        self.max_age = int(max_age)
        self.link_distance = float(link_distance)
        self.min_detections = int(min_detections)
        self.keep_images = bool(keep_images)
        self.tracks: list[Track] = []
        self.rejected: list[Track] = []  # tracks dropped by finish() as too short
        self.num_frames = 0
        self.detection_frames = 0  # frames the detector ran on

    def update(self, index: int, faces: Sequence | None, image: np.ndarray | None = None) -> list[int]:
        """Feed frame ``index``'s detections (objects with ``box``, ``score``, ``landmarks``; None when detection
        was skipped for this frame). Returns the track id of each detection."""
        self.num_frames = max(self.num_frames, index + 1)
        if faces is None:
            return []
        self.detection_frames += 1
        active = [t for t in self.tracks if index - t.last_index <= self.max_age and t.last_index < index]
        pairs = sorted(((iou(f.box, t.last_box), fi, ti) for fi, f in enumerate(faces) for ti, t in enumerate(active)),
                       reverse=True)
        assigned: dict[int, Track] = {}
        used = set()
        for v, fi, ti in pairs:
            if v < self.iou_threshold:
                break
            if fi in assigned or ti in used:
                continue
            assigned[fi] = active[ti]
            used.add(ti)
        ids = []
        for fi, f in enumerate(faces):
            track = assigned.get(fi)
            if track is None:
                track = Track(id=len(self.tracks))
                self.tracks.append(track)
            track.observe(index, f.box, f.score, getattr(f, "landmarks", None), image if self.keep_images else None)
            ids.append(track.id)
        return ids

    def finish(self) -> list[Track]:
        """Link re-found faces, drop short false-positive tracks; tracks sorted by prominence (largest first)."""
        tracks = sorted(self.tracks, key=lambda t: t.first_index)
        merged: list[Track] = []
        for t in tracks:
            if len(t.detections) == 0:
                continue
            target = None
            b = t.detections[t.first_index][0]
            c, s = np.array([(b[0] + b[2]) / 2, (b[1] + b[3]) / 2]), max(b[2] - b[0], b[3] - b[1])
            best = None
            for m in merged:
                if m.last_index >= t.first_index:
                    continue  # overlapping in time: two different faces
                lb = m.last_box
                lc = np.array([(lb[0] + lb[2]) / 2, (lb[1] + lb[3]) / 2])
                d = np.hypot(*(c - lc)) / max(s, lb[2] - lb[0], lb[3] - lb[1], 1.0)
                if d <= self.link_distance and (best is None or d < best):
                    best, target = d, m
            if target is not None:
                target.merge(t)
            else:
                merged.append(t)
        # A track seen in every frame the detector ran on is no false positive, however short the clip (a
        # one-frame clip has one detection).
        need = max(1, min(self.min_detections, self.detection_frames))
        kept = [t for t in merged if len(t.detections) >= need]
        self.rejected = [t for t in merged if len(t.detections) < need]
        kept.sort(key=lambda t: (-t.prominence, t.first_index))
        for i, t in enumerate(kept):
            t.id = i
        return kept


def extend_track(track: Track, faces: Sequence[Sequence[tuple]], claimed: set[tuple[int, int]],
                 iou_threshold: float = 0.3, max_miss: int = 2) -> int:
    """Let ``track`` reach back before its first and forward after its last detection over ``faces``.

    ``faces[i]`` lists the boxes (x0, y0, x1, y1, ...) found in frame i by a detector at least as sensitive as the
    tracker's (the coverage pass). Walking away from the track's end, a box overlapping the track's current end box
    by ``iou_threshold`` joins the track; the walk stops after ``max_miss`` frames in a row without one. Boxes in
    ``claimed`` ((frame, index) pairs) belong to another track and are skipped; the ones taken are added to it.
    Returns the number of detections added.
    """
    added = 0
    n = len(faces)
    for step in (-1, 1):
        if not track.detections:
            return added
        i = track.first_index if step < 0 else track.last_index
        ref = track.detections[i][0]
        miss = 0
        i += step
        while 0 <= i < n and miss <= max_miss:
            if i in track.detections:
                ref, miss = track.detections[i][0], 0
                i += step
                continue
            best, best_k = iou_threshold, None
            for k, f in enumerate(faces[i]):
                if (i, k) in claimed:
                    continue
                v = iou(f[:4], ref)
                if v >= best:
                    best, best_k = v, k
            if best_k is None:
                miss += 1
            else:
                box = tuple(float(v) for v in faces[i][best_k][:4])
                score = float(faces[i][best_k][4]) if len(faces[i][best_k]) > 4 else 0.0
                track.add_detection(i, box, score)
                claimed.add((i, best_k))
                ref, miss = box, 0
                added += 1
            i += step
    return added
