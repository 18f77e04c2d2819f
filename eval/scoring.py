"""Scoring one clip (and the photos) with every method: per-frame measurements streamed, metrics accumulated.

:func:`evaluate_video` tracks the target person with the pipeline's pass 1, streams the original frames and each
method's output in lockstep and returns a :class:`ClipScore` per method; :func:`evaluate_photos` does the
re-identification on the photos. :mod:`eval.run` walks the inputs (in one process or many) and :mod:`eval.tables`
writes the results.
"""
from __future__ import annotations

import functools
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import cv2
import numpy as np
from tqdm.auto import tqdm

from anonymizer.fallback import expand_box
from anonymizer.identity import FaceRecognizer
from eval import coverage as C
from eval import metrics as M
from eval import temporal as T
from eval.backbones import ImageQuality
from eval.baselines import PIXEL_METHODS, PixelMethod, keepr_frames, keepr_settings, track_target
from keepr.errors import KeeprError
from keepr.images import load_image
from models.arcface import ArcFaceRecognizer

if TYPE_CHECKING:  # for the annotations only: eval.run imports this module
    from eval.run import EvalSettings

LONDON_NAME = re.compile(r"^(\d+)_(neutral|smiling)$")
NUMBERED_NAME = re.compile(r"^([A-Za-z][A-Za-z_-]*?)[_-]?\d+$")
ARCFACE_UNAVAILABLE = "unavailable (no weights: pass --arcface model_ir_se50.pth)"


def photo_identity(path: Path) -> str:
    """Identity from the file name: London ``<id>_neutral/_smiling`` -> ``london_<id>``; a name followed by a
    number (``lisa1``, ``lisa2``) -> ``<folder>_<name>`` (one person, several photos); anything else (the Canada
    distractors ``003f``, ...) is its own identity ``<folder>_<stem>``."""
    m = LONDON_NAME.match(path.stem)
    if m:
        return f"london_{m.group(1)}"
    m = NUMBERED_NAME.match(path.stem)
    if m:
        return f"{path.parent.name}_{m.group(1)}"
    return f"{path.parent.name}_{path.stem}"


def iter_frames(path: Path, n: int) -> Iterator[np.ndarray]:
    """The first ``n`` decoded RGB frames of ``path``, one at a time (nothing but the current frame is held)."""
    from anonymizer.video import VideoReader  # heavy (av): only in iter_frames()

    k = 0
    if n <= 0:
        return
    for frame in VideoReader(path):
        yield frame.image
        k += 1
        if k >= n:
            return


def take(frames: Iterable[np.ndarray], n: int, what: str) -> Iterator[np.ndarray]:
    """The first ``n`` of ``frames``; KeeprError "<what> has K frames, expected N" when there are fewer."""
    k = 0
    if n > 0:
        for frame in frames:
            yield frame
            k += 1
            if k >= n:
                return
    if k < n:
        raise KeeprError(f"{what} has {k} frames, expected {n}")


# ----------------------------------------------------------------------------------------------------------------
# Scoring one method on one clip.


def _stack(ms: Sequence[M.FaceMeasurement], attr: str) -> np.ndarray:
    return np.stack([getattr(m, attr) for m in ms])


def _crop(frame: np.ndarray, box, size: int) -> np.ndarray:

    x0, y0, x1, y1 = box
    cx, cy, side = (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0) * 1.4
    sq = expand_box((cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2), frame.shape[1], frame.shape[0], 0.0)
    return cv2.resize(frame[sq[1] : sq[3], sq[0] : sq[2]], (size, size), interpolation=cv2.INTER_AREA)


@dataclass
class ClipFailure:
    """A video, or one method on it, that could not be evaluated."""

    video: Path
    method: str | None  # None: the video itself (reading, tracking) failed, for every method
    error: str  # one line, naming the file

    def rows(self, methods: Sequence[str]) -> list[dict]:
        """Its results.csv rows: one per method it stands for."""
        return [{"dataset": self.video.name, "method": m, "error": self.error}
                for m in ([self.method] if self.method else methods)]


def failure_message(path: Path, exc: BaseException) -> str:
    """The error on one line, naming the file (prefixed with the path when the message does not name it)."""
    msg = " ".join(str(exc).split()) or type(exc).__name__
    if str(path) in msg or path.name in msg:
        return msg
    if msg.startswith("video: "):  # a generic source name (eval.baselines.track_target): put the file in its place
        msg = msg[len("video: "):]
    return f"{path}: {msg}"


@dataclass
class ClipScore:
    """Per-frame measurements of one method on one clip, and its summary row."""

    row: dict
    distances: np.ndarray  # per-frame identity distance (NaN: no reference face or no descriptor)
    anonymized: list  # FaceMeasurement per frame


def score_method(
    name: str,
    frames: Iterable[tuple[np.ndarray, np.ndarray]],
    boxes: list,
    reference: list[M.FaceMeasurement],
    measurer: M.FaceMeasurer,
    settings: EvalSettings,
    gallery: tuple[np.ndarray, list[str]] | None = None,
    progress_desc: str = "",
    faces: list[list[tuple]] | None = None,
    arcface_reference: list | None = None,
) -> ClipScore:
    """All metrics of one anonymized clip against its original, streamed: ``frames`` yields (original, anonymized)
    pairs, one per box, and every metric accumulates per frame (the temporal ones keep only the previous frame;
    FID/KID/LPIPS keep small face crops). ``faces`` (the coverage faces per frame) adds the "faces left" columns,
    ``arcface_reference`` (the original's ArcFace embeddings per frame) ``arcface_similarity``."""
    n = len(boxes)
    it = frames
    if settings.progress:
        it = tqdm(it, total=n, desc=progress_desc or f"measure {name}", leave=False, unit="frame")
    anon: list[M.FaceMeasurement] = []
    temporal = T.TemporalStability()
    left = C.FacesLeft() if faces is not None else None
    quality = ImageQuality(settings.inception_weights, settings.lpips_weights)
    crops_orig, crops_anon = [], []
    arc_anon: list = []
    image_size = None
    for i, (orig, frame) in enumerate(it):
        box = boxes[i]
        image_size = image_size or orig.shape[:2]
        # Frames where the target is lost carry no reference face: nothing to compare, nothing measured.
        anon.append(measurer.measure(frame, box) if box is not None else M.FaceMeasurement.missing())
        temporal.update(orig, frame, box)
        if left is not None:
            left.update(orig, frame, faces[i])
        if quality.needs_crops and box is not None:
            crops_orig.append(_crop(orig, box, settings.crop_size))
            crops_anon.append(_crop(frame, box, settings.crop_size))
        if arcface_reference is not None:
            arc_anon.append(_arcface_embedding(settings.arcface, frame, reference[i]))
    if len(anon) != n:
        raise KeeprError(f"{name}: got {len(anon)} frames for {n} boxes")
    has_face = np.array([b is not None for b in boxes])
    ref_desc, anon_desc = _stack(reference, "descriptor"), _stack(anon, "descriptor")
    ref_desc = np.where(has_face[:, None], ref_desc, np.nan)

    row: dict = {"method": name}
    leak = M.IdentityLeakage()
    leak.update(ref_desc, anon_desc)
    row.update(leak.compute())
    distances = M.descriptor_distances(ref_desc, anon_desc)

    # Detection rate over the frames where the detector finds the face in the original (what anonymization keeps).
    det = M.DetectionRate()
    det.update([m.detected for m, r in zip(anon, reference) if r.detected])
    row.update(det.compute())
    fd = M.DescriptorFrechetDistance()  # real faces vs anonymized faces the detector finds
    detected = [m.descriptor for m in anon if m.detected]
    fd.update(ref_desc[has_face], np.stack(detected) if detected else np.zeros((0, M.DESCRIPTOR_DIM)))
    row.update(fd.compute())
    lp = M.LandmarkPoseError()
    lp.update(_stack(reference, "landmarks"), _stack(anon, "landmarks"), image_size)
    row.update(lp.compute())

    # Whole-track attack: average the anonymized descriptors over the clip and compare with the original's average.
    ok_ref = ~np.isnan(ref_desc).any(1)
    ok_anon = ~np.isnan(anon_desc).any(1)
    if ok_ref.any() and ok_anon.any():
        ref_mean, anon_mean = ref_desc[ok_ref].mean(0), anon_desc[ok_anon].mean(0)
        dist = float(np.linalg.norm(ref_mean - anon_mean))
        row["track_attack_distance"] = dist
        row["track_attack_match@0.6"] = float(dist < M.SAME_PERSON_THRESHOLD)
        if gallery is not None and len(gallery[1]):
            reid = M.ReIdentification(np.vstack([gallery[0], ref_mean]), list(gallery[1]) + ["__target__"])
            reid.update(anon_mean[None], ["__target__"])
            row["track_attack_top1"] = reid.compute()["reid_top1"]
    else:
        row["track_attack_distance"] = float("nan")
        row["track_attack_match@0.6"] = 0.0 if ok_ref.any() else float("nan")  # nothing to average: no leak

    row.update(temporal.compute(distances))
    if crops_orig:
        quality.update(np.stack(crops_orig), np.stack(crops_anon))
    row.update(quality.compute())
    if left is not None:
        row.update(left.compute())
    if settings.arcface:
        row["arcface_similarity"] = (ARCFACE_UNAVAILABLE if arcface_reference is None else
                                     _mean_similarity(arcface_reference, arc_anon))
    return ClipScore(row=row, distances=distances, anonymized=anon)


def evaluate_video(
    path: Path,
    settings: EvalSettings,
    measurer: M.FaceMeasurer,
    gallery: tuple[np.ndarray, list[str]] | None = None,
    work_dir: Path | None = None,
    failures: list[ClipFailure] | None = None,
) -> dict[str, ClipScore]:
    """Track the target face once, anonymize it with every method, score each.

    A KeeprError of the video itself (unreadable, no face) is raised. A KeeprError of one method is raised too,
    unless ``failures`` is given: then it is appended there (a :class:`ClipFailure` naming the file) and the other
    methods go on.
    """
    infer_settings = keepr_settings(settings.keepr)
    infer_settings.progress = settings.progress
    # The pipeline's own pass 1 over the whole video (as infer.py and the keepr method run it), then --max_frames.
    boxes = track_target(path, infer_settings, _recognizer(), settings.max_frames, progress=settings.progress)
    if all(b is None for b in boxes):
        raise KeeprError(f"{path}: no face found in any frame")
    n = len(boxes)
    # The original, streamed once for its reference measurements (a few numbers per frame).
    reference: list[M.FaceMeasurement] = []
    seen: list[list[tuple]] = []
    arc_ref: list | None = [] if settings.arcface else None
    it = zip(take(iter_frames(path, n), n, str(path)), boxes)
    if settings.progress:
        it = tqdm(it, total=n, desc=f"measure original {path.name}", leave=False, unit="frame")
    for f, b in it:
        reference.append(measurer.measure(f, b) if b is not None else M.FaceMeasurement.missing())
        seen.append(C.faces_in_frame(f, infer_settings))
        if arc_ref is not None:
            arc_ref.append(_arcface_embedding(settings.arcface, f, reference[-1]))
    scores: dict[str, ClipScore] = {}
    for name in settings.methods:
        try:
            with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
                original = take(iter_frames(path, n), n, str(path))
                if name == "keepr":  # the whole video through the pipeline, its output read back in lockstep
                    out = take(keepr_frames(path, Path(tmp) / "keepr", infer_settings), n, f"{path}: KEEP:R output")
                    pairs = zip(original, out)
                else:
                    method = PixelMethod(name, margin=settings.margin)
                    pairs = ((f, method.apply(f, b)) for f, b in zip(original, boxes))
                score = score_method(name, pairs, boxes, reference, measurer, settings, gallery,
                                     progress_desc=f"measure {name} {path.name}", faces=seen,
                                     arcface_reference=arc_ref)
            if not settings.arcface:
                score.row["arcface_similarity"] = ARCFACE_UNAVAILABLE
        except KeeprError as exc:
            if failures is None:
                raise
            failures.append(ClipFailure(path, name, failure_message(path, exc)))
            warn_failure(failures[-1])
            continue
        score.row = {"dataset": path.name, **score.row}
        scores[name] = score
    return scores


@functools.lru_cache(maxsize=1)
def _recognizer():
    """The dlib recogniser that links tracks into persons in pass 1 (as ``anonymizer.pipeline.load_models``)."""

    return FaceRecognizer()


@functools.lru_cache(maxsize=2)
def arcface_recognizer(path: str):

    return ArcFaceRecognizer(path)


def _arcface_embedding(path: str, frame: np.ndarray, reference: M.FaceMeasurement):
    """ArcFace embedding of one frame's face, aligned (FFHQ, pSp's crop) with the original frame's landmarks; None
    where the original face was not detected."""
    return arcface_recognizer(str(path)).embed_face(frame, reference.landmarks) if reference.detected else None


def _arcface_embeddings(path: str, frames, reference: list[M.FaceMeasurement]) -> list:
    """:func:`_arcface_embedding` of every frame."""
    return [_arcface_embedding(path, f, r) for f, r in zip(frames, reference)]


def _mean_similarity(original_embeddings: list, anonymized_embeddings: list) -> float:
    sims = [float(np.dot(a, b)) for a, b in zip(original_embeddings, anonymized_embeddings)
            if a is not None and b is not None]
    return float(np.mean(sims)) if sims else float("nan")


def arcface_similarity(path: str, anonymized, reference: list[M.FaceMeasurement], original_embeddings: list) -> float:
    """Mean ArcFace cosine similarity between the original and the anonymized face over the frames where the original
    face is detected, both aligned with the original's landmarks (pSp's identity similarity; lower leaks less)."""
    return _mean_similarity(original_embeddings, _arcface_embeddings(path, anonymized, reference))


# ----------------------------------------------------------------------------------------------------------------
# Photos: gallery and top-1 re-identification.


def describe_photos(paths: Sequence[Path], measurer: M.FaceMeasurer,
                    progress: bool = True) -> dict[Path, M.FaceMeasurement]:
    """The largest face of every photo (photos without a face are left out)."""

    out = {}
    it = tqdm(paths, desc="describe photos", leave=False, unit="photo") if progress else paths
    for p in it:
        m = measurer.measure(load_image(p), None)
        if m.detected:
            out[p] = m
    return out


def evaluate_photos(paths: Sequence[Path], described: dict[Path, M.FaceMeasurement], settings: EvalSettings,
                    measurer: M.FaceMeasurer) -> dict[str, dict]:
    """Per method: anonymize each London neutral probe and find its nearest gallery photo (all other photos)."""

    probes = [p for p in described if LONDON_NAME.match(p.stem) and p.stem.endswith("_neutral")]
    probes = [p for p in probes if any(photo_identity(q) == photo_identity(p) and q != p for q in described)]
    rows: dict[str, dict] = {}
    if not probes:
        return rows
    for name in settings.methods:
        row: dict = {"dataset": "photos", "method": name}
        if name not in PIXEL_METHODS:
            row["reid_top1"] = "unavailable (keepr runs on videos)"
            rows[name] = row
            continue
        reid_hits, leak, det = [], M.IdentityLeakage(), M.DetectionRate()
        it = tqdm(probes, desc=f"re-id {name}", leave=False, unit="photo") if settings.progress else probes
        for p in it:
            ref = described[p]
            img = PixelMethod(name, margin=settings.margin).apply(load_image(p), ref.box)
            anon = measurer.measure(img, ref.box)
            det.update([anon.detected])
            leak.update(ref.descriptor[None], anon.descriptor[None])
            others = [q for q in described if q != p]
            reid = M.ReIdentification(np.stack([described[q].descriptor for q in others]),
                                      [photo_identity(q) for q in others])
            reid.update(anon.descriptor[None], [photo_identity(p)])
            reid_hits.append(reid.compute())
        row["reid_probes"] = len(probes)
        row["reid_gallery"] = len(described) - 1
        row["reid_top1"] = float(np.mean([h["reid_top1"] for h in reid_hits]))
        row["reid_top1_within@0.6"] = float(np.mean([h["reid_top1_within@0.6"] for h in reid_hits]))
        r = leak.compute()
        row["photo_match_rate@0.6"] = r["match_rate@0.6"]
        row["photo_detection_rate"] = det.compute()["detection_rate"]
        rows[name] = row
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Aggregation and outputs.


def warn_failure(f: ClipFailure) -> None:
    what = "" if f.method is None else f" (method {f.method})"
    tqdm.write(f"warning: {f.error}{what}; going on with the others", file=sys.stderr)
