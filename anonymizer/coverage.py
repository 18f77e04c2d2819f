"""Coverage: every face seen in the input is anonymized (swap or fallback), kept by the user's choice, or reported.

The coverage pass (:func:`anonymizer.scan.track_faces`) runs a detector at least as sensitive as the tracking pass
on every frame. While rendering (:mod:`anonymizer.render`) each face it found is judged in the frame where it was
found, after the swaps were pasted:

- ``swap``      it lies under a swap's paste mask: the mask averages at least ``coverage.min_alpha`` over the
                face's inner box (the middle 60 %: eyes, nose, mouth);
- ``fallback``  it belongs to a chosen person (or to nobody known, with ``--face all``) and the swap does not cover
                it: the fallback (blur, mosaic, black box) is applied to the face box grown by ``coverage.margin``;
- ``left``      as for ``fallback``, but ``--fallback none``: the face is passed through, and reported;
- ``kept``      it belongs to a person the user did not choose (``--face largest`` or an index).

A face belongs to the person whose tracked box in that frame overlaps it (IoU >= 0.3); a face of nobody's track is
matched by identity (dlib descriptor under the same-person threshold) to the chosen persons when only some are
chosen, else it is treated as chosen (the safe side). Where dlib can run, each anonymized face is then compared
with the original identity: the output at that place should be at least the guard threshold away from the
person's descriptor; the frames where it is not are listed as identity matches that survived.

``CoverageTally`` adds up the per-face results into the report's ``coverage`` section.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from anonymizer.fallback import apply_region
from anonymizer.tracking import iou

OWNER_IOU = 0.3  # least overlap of a face with a person's tracked box to belong to that person
INNER = 0.6  # fraction of the face box (centred) whose paste-mask mean decides "covered by the swap"


@dataclass
class SwapRegion:
    """Where one person's swap was pasted into a frame: frame -> crop matrix and the paste mask in crop pixels."""

    person: int
    frame_to_crop: np.ndarray  # 2x3
    mask: np.ndarray  # float32 [S,S] in [0,1]


def inner_points(box: Sequence[float], frac: float = INNER, n: int = 9) -> np.ndarray:
    """An n x n grid of (x, y) points over the central ``frac`` of ``box``."""
    x0, y0, x1, y1 = (float(v) for v in box[:4])
    cx, cy, hw, hh = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) * frac / 2, (y1 - y0) * frac / 2
    xs, ys = np.meshgrid(np.linspace(cx - hw, cx + hw, n), np.linspace(cy - hh, cy + hh, n))
    return np.stack([xs.ravel(), ys.ravel()], axis=1)


def swap_alpha(region: SwapRegion, box: Sequence[float]) -> float:
    """Mean paste mask over the face's inner box (0 where the points fall outside the crop)."""
    pts = inner_points(box)
    m = region.frame_to_crop
    cx = m[0, 0] * pts[:, 0] + m[0, 1] * pts[:, 1] + m[0, 2]
    cy = m[1, 0] * pts[:, 0] + m[1, 1] * pts[:, 1] + m[1, 2]
    s = region.mask.shape[0]
    ix, iy = np.rint(cx).astype(int), np.rint(cy).astype(int)
    inside = (ix >= 0) & (ix < s) & (iy >= 0) & (iy < s)
    vals = np.zeros(len(pts), np.float32)
    vals[inside] = region.mask[iy[inside], ix[inside]]
    return float(vals.mean())


def owner_of(box: Sequence[float], person_boxes: dict[int, Sequence[float]]) -> int | None:
    """The person whose tracked box overlaps ``box`` most (IoU >= OWNER_IOU), else None."""
    best, who = OWNER_IOU, None
    for pid, pb in person_boxes.items():
        v = iou(box[:4], pb)
        if v >= best:
            best, who = v, pid
    return who


def _face(box: Sequence[float], landmarks: np.ndarray):
    from anonymizer.faces import Face  # heavy (torch): only in _face()

    b = tuple(int(round(v)) for v in box[:4])
    return Face(box=b, landmarks=landmarks, score=0.0)


def descriptor_at(recognizer, rgb: np.ndarray, box: Sequence[float]) -> np.ndarray | None:
    """dlib descriptor of the face at ``box`` in ``rgb`` (landmarks predicted inside the box)."""
    from anonymizer.faces import landmarks_for_box  # heavy (torch): only in descriptor_at()

    if recognizer is None:
        return None
    b = [float(v) for v in box[:4]]
    if b[2] - b[0] < 4 or b[3] - b[1] < 4:
        return None
    return recognizer.descriptor(rgb, _face(b, landmarks_for_box(rgb, b)))


@dataclass
class CoverFrame:
    """Everything :func:`cover_frame` needs to know about the choice of persons (fixed for a video)."""

    chosen: set[int]  # person ids chosen for anonymization
    every_person: bool  # --face all: faces of nobody's track are anonymized too
    descriptors: dict[int, np.ndarray]  # person id -> reference descriptor (may lack some)
    fallback: str  # blur | mosaic | blackbox | none
    min_alpha: float
    margin: float
    identity: bool  # check anonymized faces against the original identity
    threshold: float  # same-person threshold of dlib
    recognizer: object = None
    failed: dict = None  # chosen person id -> why no virtual face could be made (their faces get the fallback)

    def __post_init__(self):
        self.failed = dict(self.failed or {})


def cover_frame(ctx: CoverFrame, frame_in: np.ndarray, frame_out: np.ndarray, faces: Sequence[tuple],
                person_boxes: dict[int, Sequence[float]], regions: Sequence[SwapRegion],
                check_identity: bool = True) -> list[dict]:
    """Judge (and, where needed, fall back on) every face of one frame; ``frame_out`` is changed in place.

    ``faces``: (x0, y0, x1, y1, score[, inferred]) found by the coverage pass in this frame; ``person_boxes``: each
    person's
    tracked box in this frame (persons without one are absent); ``regions``: the swaps pasted into it;
    ``check_identity``: compare the anonymized faces with the original identity in this frame (if ``ctx.identity``).
    Returns one dict per face: box, person, result, reason, alpha and, when checked, identity_distance.
    """
    from anonymizer.identity import descriptor_distance  # heavy (torch): only in cover_frame()

    results = []
    for f in faces:
        box = tuple(float(v) for v in f[:4])
        owner = owner_of(box, person_boxes)
        rec = {"box": [round(v, 1) for v in box], "person": owner, "result": None, "reason": None}
        if len(f) > 5 and f[5]:
            rec["inferred"] = True  # between detections of a face no person's track holds
        matched_by = "track" if owner is not None else None
        if owner is None and not ctx.every_person and ctx.recognizer is not None and ctx.chosen:
            d_in = descriptor_at(ctx.recognizer, frame_in, box)
            if d_in is not None:
                dists = {p: descriptor_distance(d_in, ctx.descriptors[p]) for p in ctx.chosen
                         if ctx.descriptors.get(p) is not None}
                if dists:
                    p, d = min(dists.items(), key=lambda kv: kv[1])
                    if d < ctx.threshold:
                        owner, matched_by = p, "identity"
                        rec["person"] = p
        rec["matched_by"] = matched_by
        chosen = owner in ctx.chosen if owner is not None else ctx.every_person
        if not chosen:
            rec["result"] = "kept"
            rec["reason"] = "person not chosen (--face)" if owner is not None else "unknown face, not chosen (--face)"
            results.append(rec)
            continue
        alpha = max((swap_alpha(r, box) for r in regions), default=0.0)
        rec["alpha"] = round(alpha, 3)
        if alpha >= ctx.min_alpha:
            rec["result"] = "swap"
        else:
            if owner is None:
                why = "face in no track"
            elif owner not in person_boxes:
                why = "person not tracked in this frame"
            elif matched_by == "identity":
                why = "face away from the person's tracked box"
            elif owner in ctx.failed:
                why = f"no virtual face ({ctx.failed[owner]})"
            else:
                why = "the swap's mask does not cover the face"
            if ctx.fallback != "none":
                frame_out[...] = apply_region(frame_out, box, ctx.fallback, margin=ctx.margin)
                rec["result"], rec["reason"] = "fallback", why
            else:
                rec["result"], rec["reason"] = "left", f"{why}; --fallback none"
        results.append(rec)

    if check_identity and ctx.identity and ctx.recognizer is not None:
        for rec in results:
            if rec["result"] not in ("swap", "fallback", "left"):
                continue
            ref = ctx.descriptors.get(rec["person"]) if rec["person"] is not None else None
            if ref is None:
                ref = descriptor_at(ctx.recognizer, frame_in, rec["box"])
            out = descriptor_at(ctx.recognizer, frame_out, rec["box"]) if ref is not None else None
            if out is not None:
                d = descriptor_distance(out, ref)
                rec["identity_distance"] = round(d, 4)
                rec["identity_match"] = bool(d < ctx.threshold)
    return results


def ranges(frames) -> list[list[int]]:
    """Sorted frame indices -> [[first, last], ...] runs."""
    out: list[list[int]] = []
    for i in sorted(set(int(v) for v in frames)):
        if out and i == out[-1][1] + 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return out


class CoverageTally:
    """Adds up :func:`cover_frame` results into the report's ``coverage`` section."""

    def __init__(self, persons: Sequence, chosen: set[int], detector: dict, ctx: CoverFrame):
        self.persons = list(persons)
        self.chosen = set(chosen)
        self.detector = dict(detector)
        self.ctx = ctx
        self._rows: dict[object, dict] = {}
        self.frames_with_faces: set[int] = set()
        self.frames_left: set[int] = set()

    def _row(self, person) -> dict:
        if person not in self._rows:
            self._rows[person] = {"present": set(), "swap": set(), "fallback": set(), "left": {}, "kept": set(),
                                  "identity_match": set(), "distances": [], "fallback_why": {}}
        return self._rows[person]

    def add(self, index: int, results: Sequence[dict]) -> None:
        if results:
            self.frames_with_faces.add(index)
        for rec in results:
            row = self._row(rec["person"])
            row["present"].add(index)
            res = rec["result"]
            if res == "swap":
                row["swap"].add(index)
            elif res == "fallback":
                row["fallback"].add(index)
                row["fallback_why"].setdefault(rec["reason"], set()).add(index)
            elif res == "left":
                row["left"].setdefault(rec["reason"], set()).add(index)
                self.frames_left.add(index)
            else:
                row["kept"].add(index)
            if "identity_distance" in rec:
                row["distances"].append(rec["identity_distance"])
                if rec.get("identity_match"):
                    row["identity_match"].add(index)

    def _entry(self, person, row: dict) -> dict:
        done = row["swap"] | row["fallback"]
        left = set().union(*row["left"].values()) if row["left"] else set()
        d = row["distances"]
        return {
            "person": person,
            "chosen": (person in self.chosen) if person is not None else self.ctx.every_person,
            "frames_present": len(row["present"]),
            "present": ranges(row["present"]),
            "frames_anonymized": len(done),
            "frames_swapped": len(row["swap"]),
            "frames_fallback": len(row["fallback"]),
            "fallback": [{"frames": ranges(v), "reason": k} for k, v in sorted(row["fallback_why"].items())],
            "frames_left": len(left),
            "left": [{"frames": ranges(v), "reason": k} for k, v in sorted(row["left"].items())],
            "frames_kept": len(row["kept"]),
            "kept": ranges(row["kept"]),
            "identity_checked": len(d),
            "identity_matches": ranges(row["identity_match"]),
            "identity_distance": None if not d else {"min": round(min(d), 4), "mean": round(float(np.mean(d)), 4)},
        }

    def summary(self) -> dict:
        persons = [self._entry(p.id, self._row(p.id)) for p in self.persons]
        unknown = self._entry(None, self._rows[None]) if None in self._rows else None
        entries = persons + ([unknown] if unknown else [])
        not_anonymized = []
        for e in entries:
            for item in e["left"]:
                not_anonymized.append({"person": e["person"], "frames": item["frames"], "reason": item["reason"]})
            if e["kept"]:
                not_anonymized.append({"person": e["person"], "frames": e["kept"], "reason": "not chosen (--face)"})
        faces = {k: sum(len(r[k]) for r in self._rows.values()) for k in ("present", "swap", "fallback", "kept")}
        left = sum(len(s) for r in self._rows.values() for s in r["left"].values())
        matches = sum(len(r["identity_match"]) for r in self._rows.values())
        checked = sum(len(r["distances"]) for r in self._rows.values())
        return {
            "detector": self.detector,
            "fallback": self.ctx.fallback,
            "min_alpha": self.ctx.min_alpha,
            "identity_check": bool(self.ctx.identity and self.ctx.recognizer is not None),
            "complete": left == 0,
            "frames_with_faces": len(self.frames_with_faces),
            "frames_with_faces_left": ranges(self.frames_left),
            "face_frames": faces["present"],
            "anonymized": faces["swap"] + faces["fallback"],
            "by_swap": faces["swap"],
            "by_fallback": faces["fallback"],
            "left": left,
            "kept": faces["kept"],
            "identity_checked": checked,
            "identity_matches": matches,
            "persons": persons,
            "unknown": unknown,
            "not_anonymized": not_anonymized,
        }


def one_line(cov: dict) -> str:
    """The coverage part of the last line infer.py prints."""
    s = (f"coverage: {cov['anonymized']}/{cov['face_frames'] - cov['kept']} chosen face(s) anonymized "
         f"({cov['by_swap']} swap, {cov['by_fallback']} {cov['fallback']}), {cov['left']} left")
    if cov["kept"]:
        s += f", {cov['kept']} kept by choice"
    if cov["identity_check"]:
        s += f"; original identity still matches in {cov['identity_matches']} of {cov['identity_checked']} checked"
    return s
