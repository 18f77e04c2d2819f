"""Evaluate anonymization methods on videos and photos: identity leakage, realism/utility, temporal stability.

    python -m eval.run --videos data/samples/lrwp9a.mpg tests/fixtures/media/videos/bbaf2n.mpg \
        --photos tests/fixtures/media/photos --methods keepr,blur,mosaic,blackbox,none --out results/

Every method anonymizes the same tracked face (``anonymizer.tracking.FaceTracker`` over dlib HOG detections, the
largest track). For each video and method the anonymized face is compared with the original frame by frame
(``eval.metrics``, ``eval.temporal``); for the photos, each London ``<id>_neutral`` photo is anonymized and looked
up in a gallery of all other photos (top-1 re-identification).

Outputs in ``--out`` (each written atomically): ``results.csv`` (one row per video and method, plus ``ALL videos``
and ``photos`` rows), ``results.md`` (the per-method table), ``leakage_vs_realism.png`` and
``identity_distance.png`` (per-frame identity distance per method and video).

A video that fails (a KeeprError: no face found, unreadable, a method that fails on it) does not stop the
evaluation: it is reported with its error (an ``error`` column in results.csv naming the file and the cause, a
"Failed" list in results.md, a warning on stderr) and the other videos go on. Only when every video fails does the
evaluation fail (one line, exit status 1), after writing results.csv and results.md with the errors.

Many processes: ``--trainer.devices N --trainer.accelerator cpu|gpu --trainer.strategy ddp [--trainer.num_nodes M]``
split the videos across Lightning ranks (whole videos, the longest first, dealt round-robin); each rank scores its
videos and writes each one's results (``OUT/.eval-parts/``), and rank 0 merges them in the order of the videos into
the same results.csv, results.md and plots as one process (then removes the parts). Photos are scored on rank 0.
"""
from __future__ import annotations

import argparse
import functools
import logging
import pickle
import re
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import cv2
import numpy as np
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from anonymizer.batch import Item, deal, input_work
from anonymizer.checks import validate_settings
from anonymizer.fallback import expand_box
from anonymizer.identity import FaceRecognizer
from eval import coverage as C
from eval import metrics as M
from eval import temporal as T
from eval.backbones import ImageQuality
from eval.baselines import PIXEL_METHODS, PixelMethod, keepr_frames, keepr_settings, parse_methods, track_target
from eval.tables import aggregate, markdown_table, plot_results, write_csv
from keepr.errors import KeeprError, cli_main
from keepr.fileio import atomic_path
from keepr.images import load_image
from models.arcface import ArcFaceRecognizer

VIDEO_SUFFIXES = {".mp4", ".mpg", ".mpeg", ".mkv", ".avi", ".mov", ".gif", ".webm"}
PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
LONDON_NAME = re.compile(r"^(\d+)_(neutral|smiling)$")
NUMBERED_NAME = re.compile(r"^([A-Za-z][A-Za-z_-]*?)[_-]?\d+$")

ARCFACE_UNAVAILABLE = "unavailable (no weights: pass --arcface model_ir_se50.pth)"


@dataclass
class EvalSettings:
    """What to evaluate and how (command-line flags map one to one)."""

    methods: list[str] = field(default_factory=lambda: ["keepr", "blur", "mosaic", "blackbox", "none"])
    max_frames: int | None = None  # evaluate only the first N frames of each video (None: all)
    upsample: int = 1  # dlib HOG upsampling for measuring (tracking follows the infer settings)
    margin: float = 0.2  # pixel methods: box growth on each side
    inception_weights: str | None = None  # torchvision Inception-v3 weights for FID/KID
    lpips_weights: str | None = None  # torchvision AlexNet weights for LPIPS
    crop_size: int = 160  # face crop side for FID/KID/LPIPS
    keepr: dict = field(default_factory=dict)  # infer.py options (config, generator, seed, ...); also set the tracking
    arcface: str | None = None  # model_ir_se50.pth: adds arcface_similarity (pSp's identity similarity)
    progress: bool = True


# ----------------------------------------------------------------------------------------------------------------
# Inputs.


def list_files(paths: Sequence[str | Path] | None, suffixes: set[str], what: str) -> list[Path]:
    """Expand files and directories (recursively) into a sorted list of files with the given suffixes."""
    out: list[Path] = []
    for p in paths or []:
        p = Path(p)
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in suffixes))
        elif p.is_file():
            out.append(p)
        else:
            raise KeeprError(f"{p}: no such {what} file or directory")
    return list(dict.fromkeys(out))


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
            _warn(failures[-1])
            continue
        score.row = {"dataset": path.name, **score.row}
        scores[name] = score
    return scores


@functools.lru_cache(maxsize=1)
def _recognizer():
    """The dlib recogniser that links tracks into persons in pass 1 (as ``anonymizer.pipeline.load_models``)."""

    return FaceRecognizer()


@functools.lru_cache(maxsize=2)
def _arcface(path: str):

    return ArcFaceRecognizer(path)


def _arcface_embedding(path: str, frame: np.ndarray, reference: M.FaceMeasurement):
    """ArcFace embedding of one frame's face, aligned (FFHQ, pSp's crop) with the original frame's landmarks; None
    where the original face was not detected."""
    return _arcface(str(path)).embed_face(frame, reference.landmarks) if reference.detected else None


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


@dataclass
class EvalResult:
    rows: list[dict]  # everything written to results.csv
    summary: dict[str, dict]  # per-method aggregate over videos
    photo_rows: dict[str, dict]
    per_video: dict[str, dict[str, ClipScore]]
    table: str  # results.md
    files: list[Path]
    failures: list[ClipFailure] = field(default_factory=list)  # videos (or methods on them) that failed


def _warn(f: ClipFailure) -> None:
    what = "" if f.method is None else f" (method {f.method})"
    tqdm.write(f"warning: {f.error}{what}; going on with the others", file=sys.stderr)


def video_result(v: Path, settings: EvalSettings, measurer: M.FaceMeasurer,
                 gallery: tuple[np.ndarray, list[str]] | None) -> tuple[dict[str, ClipScore], list[ClipFailure],
                                                                      list[dict]]:
    """One video: (scores per method, failures, its results.csv rows in the order of the methods)."""
    failures: list[ClipFailure] = []
    try:
        scores = evaluate_video(v, settings, measurer, gallery, failures=failures)
    except KeeprError as exc:  # the video itself: unreadable, no face...
        failures.append(ClipFailure(v, None, failure_message(v, exc)))
        _warn(failures[-1])
        scores = {}
    # Rows in the order of the methods: scores and errors of this video.
    errors = {m: f for f in failures for m in ([f.method] if f.method else settings.methods)}
    rows = []
    for m in settings.methods:
        if m in scores:
            rows.append(scores[m].row)
        elif m in errors:
            rows.append({"dataset": v.name, "method": m, "error": errors[m].error})
    return scores, failures, rows


# ----------------------------------------------------------------------------------------------------------------
# Many processes (--trainer.devices N): videos split across Lightning ranks, merged on rank 0.

PARTS_DIR = ".eval-parts"  # per-video results inside --out while a distributed evaluation runs


def evaluate_distributed(video_paths: Sequence[Path], settings: EvalSettings, measurer: M.FaceMeasurer,
                         gallery, out_dir: Path, trainer_kwargs: dict) -> list | None:
    """Every video's :func:`video_result`, computed on the rank that owns it (``Trainer.predict`` over video
    indices; whole videos, the longest first, dealt round-robin as in ``anonymizer.batch``) and written per video
    (``OUT/.eval-parts/<index>.pkl``, atomically); rank 0 reads them back in the order of the videos after every rank
    is done and returns them (the parts are removed); other ranks return None."""

    import pytorch_lightning as pl  # heavy (lightning): only in evaluate_distributed()

    items = [Item(k, str(v), v.name, "", "video",
                  input_work(v, "video") if settings.max_frames is None else _capped_work(v, settings.max_frames))
             for k, v in enumerate(video_paths)]
    parts = Path(out_dir) / PARTS_DIR

    class Indices(Dataset):
        def __len__(self):
            return len(items)

        def __getitem__(self, i):
            return int(i)

    class Owned(Sampler):
        def __init__(self, rank: int, world: int):
            self.indices = deal(items, world)[rank]

        def __iter__(self):
            return iter(self.indices)

        def __len__(self):
            return len(self.indices)

    class EvalVideos(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.merged: list | None = None
            self.bar = None

        def setup(self, stage):
            if self.trainer.global_rank == 0:
                if parts.exists():
                    shutil.rmtree(parts)  # left by a killed run
                parts.mkdir(parents=True)
            self.trainer.strategy.barrier("eval-parts")

        def predict_dataloader(self):
            t = self.trainer
            sampler = Owned(t.global_rank, t.world_size)
            if settings.progress:
                self.bar = tqdm(total=len(sampler), desc=f"rank {t.global_rank} videos", unit="video",
                                position=t.local_rank)
            return DataLoader(Indices(), batch_size=None, sampler=sampler, num_workers=0)

        def predict_step(self, batch, batch_idx):
            k = int(batch)
            result = video_result(video_paths[k], settings, measurer, gallery)
            with atomic_path(parts / f"{k:06d}.pkl", ".pkl") as tmp:
                tmp.write_bytes(pickle.dumps(result))
            if self.bar is not None:
                self.bar.update(1)
            return None

        def teardown(self, stage):
            if self.bar is not None:
                self.bar.close()
            self.trainer.strategy.barrier("eval-merge")
            if self.trainer.global_rank == 0:
                self.merged = [pickle.loads((parts / f"{k:06d}.pkl").read_bytes()) for k in range(len(items))]
                shutil.rmtree(parts, ignore_errors=True)

    for name in ("pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    kwargs = {k: v for k, v in trainer_kwargs.items() if v is not None}
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, use_distributed_sampler=False,
                         enable_model_summary=False, enable_progress_bar=False, inference_mode=False, **kwargs)
    module = EvalVideos()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(does not have many workers|Total length of `DataLoader`"
                                "|GPU available but not used|predict returned None|LeafSpec).*")
        trainer.predict(module, return_predictions=False)
    return module.merged if trainer.global_rank == 0 else None


def _capped_work(path: Path, max_frames: int) -> float:
    """Frames (at most ``max_frames``) x pixels of a video from its header; 0 when it cannot be read."""
    try:
        from anonymizer.video import probe_video  # heavy (av): only in _capped_work()

        info = probe_video(path)
        frames = info.num_frames or (info.duration or 0.0) * float(info.fps) or max_frames
        return float(min(frames, max_frames)) * info.width * info.height
    except Exception:  # noqa: BLE001 (an unreadable video fails on its rank; here it only goes last)
        return 0.0


def evaluate(videos: Sequence[str | Path], photos: Sequence[str | Path] | None, out_dir: str | Path,
             settings: EvalSettings | None = None, trainer: dict | None = None) -> EvalResult | None:
    """Run the whole evaluation and write results.csv, results.md and the plots to ``out_dir``.

    ``trainer``: Lightning Trainer options (``devices``, ``accelerator``, ``strategy``, ``num_nodes``): the videos
    are split across its ranks (:func:`evaluate_distributed`) and rank 0 writes the same outputs a single process
    writes; other ranks return None. None: one process, no Lightning.
    """
    settings = settings or EvalSettings()
    settings.methods = parse_methods(settings.methods)
    video_paths = list_files(videos, VIDEO_SUFFIXES, "video")
    if not video_paths:
        raise KeeprError("--videos: no video files given")
    photo_paths = list_files(photos, PHOTO_SUFFIXES, "photo")
    out_dir = Path(out_dir)
    if "keepr" in settings.methods:
        from anonymizer.pipeline import check_model_files  # heavy (PIL): only in evaluate()

        infer_settings = keepr_settings(settings.keepr)
        validate_settings(infer_settings)
        check_model_files(infer_settings.models)  # fail before any work when a model file is missing
    if settings.arcface:
        _arcface(str(settings.arcface))  # missing or unreadable weights: one-line error before any work
    measurer = M.FaceMeasurer(upsample=settings.upsample)

    described = describe_photos(photo_paths, measurer, settings.progress) if photo_paths else {}
    gallery = None
    if described:
        gallery = (np.stack([m.descriptor for m in described.values()]), [photo_identity(p) for p in described])

    per_video: dict[str, dict[str, ClipScore]] = {}
    failures: list[ClipFailure] = []
    rows: list[dict] = []
    if trainer is not None:  # the videos split across ranks; rank 0 goes on with every video's results
        results = evaluate_distributed(video_paths, settings, measurer, gallery, out_dir, trainer)
        if results is None:
            return None
    else:
        it = tqdm(video_paths, desc="videos", unit="video") if settings.progress else video_paths
        results = (video_result(v, settings, measurer, gallery) for v in it)
    for v, (scores, video_failures, video_rows) in zip(video_paths, results):
        if scores:
            per_video[v.name] = scores
        failures += video_failures
        rows += video_rows
    summary = aggregate(per_video, settings.methods)
    photo_rows = evaluate_photos(photo_paths, described, settings, measurer) if described else {}

    rows += list(summary.values()) + list(photo_rows.values())
    evaluated = [v for v in video_paths if v.name in per_video]
    table = markdown_table(summary, photo_rows, evaluated, len(described), failures)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KeeprError(f"{out_dir}: cannot create the output directory ({exc.strerror})") from None
    write_csv(out_dir / "results.csv", rows)
    with atomic_path(out_dir / "results.md", ".md") as tmp:
        tmp.write_text(table)
    files = [out_dir / "results.csv", out_dir / "results.md"]
    if not per_video:
        raise KeeprError(f"every video failed ({len(video_paths)}): {failures[0].error}"
                         f"{f' (and {len(failures) - 1} more)' if len(failures) > 1 else ''}; the errors are in "
                         f"{out_dir / 'results.csv'}")
    files += plot_results(out_dir, summary, per_video)
    return EvalResult(rows, summary, photo_rows, per_video, table, files, failures)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--videos", nargs="+", required=True, help="video files or directories")
    p.add_argument("--photos", nargs="*", default=None, help="photo files or directories (re-identification gallery)")
    p.add_argument("--methods", default="keepr,blur,mosaic,blackbox,none", help="comma-separated methods")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--max_frames", type=int, default=None, help="evaluate only the first N frames of each video")
    p.add_argument("--upsample", type=int, default=1, help="dlib HOG upsampling steps")
    p.add_argument("--margin", type=float, default=0.2, help="pixel methods: face box growth per side")
    p.add_argument("--inception_weights", default=None, help="torchvision Inception-v3 weights (FID/KID)")
    p.add_argument("--lpips_weights", default=None, help="torchvision AlexNet weights (LPIPS)")
    p.add_argument("--arcface", default=None,
                   help="ArcFace IR-SE-50 model_ir_se50.pth (TreB1eN/InsightFace_Pytorch, as in pSp/e4e): adds "
                        "arcface_similarity")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    t = p.add_argument_group("many processes (Lightning; any of these splits the videos across ranks, results are "
                             "merged on rank 0 into the same outputs)")
    t.add_argument("--trainer.devices", dest="devices", default=None,
                   help="devices (processes) per node, e.g. 2 or 'auto'")
    t.add_argument("--trainer.accelerator", dest="accelerator", default=None, help="cpu, gpu or auto")
    t.add_argument("--trainer.strategy", dest="strategy", default=None, help="e.g. ddp")
    t.add_argument("--trainer.num_nodes", dest="num_nodes", type=int, default=None, help="nodes (SLURM: srun)")
    g = p.add_argument_group("keepr method (passed to anonymizer.pipeline)")
    g.add_argument("--config", default=None, help="infer config YAML (e.g. configs/infer/tiny.yaml)")
    g.add_argument("--generator", default=None)
    g.add_argument("--encoder", default=None)
    g.add_argument("--cosegmentation", default=None)
    g.add_argument("--cosegmentation_config", default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--candidate", type=int, default=None)
    return p


@cli_main
def main(argv: Sequence[str] | None = None) -> EvalResult | None:
    args = build_parser().parse_args(argv)
    keepr = {k: getattr(args, k) for k in ("config", "generator", "encoder", "cosegmentation",
                                           "cosegmentation_config", "seed", "candidate")
             if getattr(args, k) is not None}
    settings = EvalSettings(
        methods=parse_methods(args.methods), max_frames=args.max_frames, upsample=args.upsample, margin=args.margin,
        inception_weights=args.inception_weights, lpips_weights=args.lpips_weights, keepr=keepr, arcface=args.arcface,
        progress=not args.no_progress,
    )
    trainer = {k: getattr(args, k) for k in ("devices", "accelerator", "strategy", "num_nodes")
               if getattr(args, k) is not None}
    if isinstance(trainer.get("devices"), str) and trainer["devices"].isdigit():
        trainer["devices"] = int(trainer["devices"])
    result = evaluate(args.videos, args.photos, args.out, settings, trainer=trainer or None)
    if result is None:  # a rank other than 0 of a distributed evaluation: rank 0 writes and prints
        return None
    print(result.table)
    for f in result.files:
        print(f"wrote {f}")
    return result


if __name__ == "__main__":
    main()
