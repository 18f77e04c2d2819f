"""People, not tracks: the tracks of one person (a hard cut, a person leaving and coming back) linked into one.

A tracker follows a face while its box keeps overlapping; a cut or a long absence starts a new track. Two tracks
are the same person when they never overlap in time and dlib's identity descriptors of their best frames are
closer than the same-person threshold (0.6, dlib's calibration on LFW). Linking is agglomerative: closest pair
first, and a group never takes a track that overlaps one of its tracks in time (two faces in one frame are two
people).

A ``Person`` gets one virtual face, one entry in the report and one thumbnail. Its per-frame box comes from its
tracks' timelines: in each frame the track with the best status there (detected > interpolated > held), so boxes
are never interpolated or smoothed across a cut.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from anonymizer.tracking import STATUSES, Track, TrackedBox
from keepr.errors import KeeprError

_RANK = {s: k for k, s in enumerate(STATUSES)}  # detected 0 < interpolated 1 < held 2 < lost 3


@dataclass
class Person:
    """One person: their tracks (in time order), identity descriptor and best frame."""

    id: int
    tracks: list[Track]
    descriptor: np.ndarray | None = None  # dlib 128-d descriptor of the best frame (None: not computed / no face)
    track_ids: list[int] = field(default_factory=list)  # the tracker's ids of the linked tracks

    @property
    def best(self) -> Track:
        """The track holding the person's best view (largest frontal face)."""
        return max(self.tracks, key=lambda t: t.best_quality)

    @property
    def prominence(self) -> float:
        return float(sum(t.prominence for t in self.tracks))

    @property
    def first_index(self) -> int:
        return min(t.first_index for t in self.tracks)

    @property
    def last_index(self) -> int:
        return max(t.last_index for t in self.tracks)

    @property
    def num_detections(self) -> int:
        return sum(len(t.detections) for t in self.tracks)

    def detected_frames(self) -> set[int]:
        return {i for t in self.tracks for i in t.detections}

    def thumbnail(self, size: int = 128) -> np.ndarray | None:
        """A square RGB crop of the best frame around the face (for choosing people on the web page)."""
        import cv2  # heavy (cv2): only in thumbnail()

        t = self.best
        if t.best_image is None or t.best_box is None:
            return None
        ox, oy = t.best_offset
        x0, y0, x1, y1 = t.best_box
        cx, cy, side = (x0 + x1) / 2 - ox, (y0 + y1) / 2 - oy, 1.6 * max(x1 - x0, y1 - y0)
        h, w = t.best_image.shape[:2]
        a, b = int(max(0, cx - side / 2)), int(max(0, cy - side / 2))
        crop = t.best_image[b:int(min(h, cy + side / 2)), a:int(min(w, cx + side / 2))]
        if crop.size == 0:
            return None
        return cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)

    def timeline(self, num_frames: int, max_gap: int = 10, hold: int = 5, radius: int = 2) -> list[TrackedBox]:
        """One ``TrackedBox`` per frame: per frame, the box of the track with the best status there."""
        lines = [t.timeline(num_frames, max_gap, hold, radius) for t in self.tracks]
        if len(lines) == 1:
            return lines[0]
        out = []
        for i in range(int(num_frames)):
            best = None
            for t, line in zip(self.tracks, lines):
                tb = line[i]
                key = (_RANK[tb.status], _frames_outside(t, i))
                if best is None or key < best[0]:
                    best = (key, tb)
            out.append(best[1])
        return out


def _frames_outside(track: Track, i: int) -> int:
    """Frames from ``i`` to the track's detected span (0 inside it): the nearer track wins between held boxes."""
    if track.first_index <= i <= track.last_index:
        return 0
    return min(abs(i - track.first_index), abs(i - track.last_index))


def overlaps(a: Sequence[Track], b: Sequence[Track]) -> bool:
    """Whether any track of ``a`` shares a frame span with any track of ``b``."""
    return any(x.first_index <= y.last_index and y.first_index <= x.last_index for x in a for y in b)


def track_descriptor(recognizer, track: Track) -> np.ndarray | None:
    """dlib descriptor of a track's best frame (None when it has no kept image or landmarks)."""
    from anonymizer.faces import Face  # heavy (torch): only in track_descriptor()

    if recognizer is None or track.best_image is None or track.best_landmarks is None or track.best_box is None:
        return None
    ox, oy = track.best_offset
    b = track.best_box
    face = Face(box=tuple(int(round(v)) for v in (b[0] - ox, b[1] - oy, b[2] - ox, b[3] - oy)),
                landmarks=np.asarray(track.best_landmarks) - np.array([ox, oy]), score=0.0)
    return recognizer.descriptor(track.best_image, face)


def link_persons(tracks: Sequence[Track], recognizer=None, threshold: float | None = 0.6) -> list[Person]:
    """Group tracks into persons (see the module docstring); persons sorted by prominence, ids 0, 1, ..."""
    from anonymizer.identity import descriptor_distance  # heavy (torch): only in link_persons()

    groups = [[t] for t in tracks]
    descs = [track_descriptor(recognizer, t) for t in tracks]
    if threshold is not None and recognizer is not None:
        owner = list(range(len(tracks)))  # track k -> group index
        pairs = sorted((descriptor_distance(descs[a], descs[b]), a, b) for a in range(len(tracks))
                       for b in range(a + 1, len(tracks)) if descs[a] is not None and descs[b] is not None)
        for d, a, b in pairs:
            if d >= threshold:
                break
            ga, gb = owner[a], owner[b]
            if ga == gb or overlaps(groups[ga], groups[gb]):
                continue
            groups[ga].extend(groups[gb])
            for k in range(len(owner)):
                if owner[k] == gb:
                    owner[k] = ga
            groups[gb] = []
    desc_of = {id(t): dsc for t, dsc in zip(tracks, descs)}
    persons = []
    for g in groups:
        if not g:
            continue
        g = sorted(g, key=lambda t: t.first_index)
        p = Person(id=-1, tracks=g, track_ids=[t.id for t in g])
        p.descriptor = desc_of[id(p.best)]
        persons.append(p)
    persons.sort(key=lambda p: (-p.prominence, p.first_index))
    for k, p in enumerate(persons):
        p.id = k
    return persons


def select_persons(persons: Sequence[Person], which: str | int = "all", source: str = "video") -> list[Person]:
    """``all``, ``largest`` (the most prominent person) or an index into the prominence order."""

    persons = list(persons)
    if not persons:
        raise KeeprError(f"{source}: no face found in any frame")
    if which == "all":
        return persons
    if which == "largest":
        return persons[:1]
    if isinstance(which, (int, np.integer)) and not isinstance(which, bool):
        if not 0 <= which < len(persons):
            raise KeeprError(f"{source}: person index {which} out of range, {len(persons)} person(s) found")
        return [persons[int(which)]]
    raise KeeprError(f"face selection must be 'all', 'largest' or an integer index, got {which!r}")
