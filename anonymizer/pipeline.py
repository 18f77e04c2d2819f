"""The anonymization pipeline: a video in, the same video with every chosen person's face replaced out.

Three public steps, called in this order by ``infer.py``, ``eval`` and the web page alike:

1. :func:`anonymizer.scan.track_faces` (pass 1): detection, tracking, the coverage detector on every frame,
   tracks linked into persons.
2. :func:`virtual_faces`: one virtual face per chosen person from their best frame (:mod:`anonymizer.virtual_face`:
   candidates, identity guard, skin match).
3. :func:`render_video` (pass 2, :func:`anonymizer.render.render`): part swap, paste back, coverage check and
   fallback, encoding, report.

:func:`check_input` makes every check that can be made before the work (settings, input video, encoder settings,
the plan for the input's other streams, model files). :func:`anonymize_video` runs it all, the output directory
checked and locked first, and writes
``anonymized.mp4``, the candidate grids, latents and ``report.json`` into a temporary directory renamed into place
when complete (``keepr.fileio.atomic_dir``): on failure nothing appears at ``out_dir``.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from anonymizer.checks import prepared_output, validate_settings
from anonymizer.coverage import CoverageTally, CoverFrame, one_line
from anonymizer.crop import crop_aligned, crop_box
from anonymizer.identity import FaceRecognizer
from anonymizer.persons import Person, select_persons
from anonymizer.render import Target, render, to_tensor
from anonymizer.report import build_report, write_report
from anonymizer.scan import Cancelled, Progress, Scan, Stopwatch, no_face_message, track_faces
from anonymizer.settings import (  # noqa: F401 (public API)
    GROUPS,
    BlendSettings,
    CoverageSettings,
    CropSettings,
    DetectSettings,
    EncodeSettings,
    InferSettings,
    ModelPaths,
    SwapSettings,
    TrackSettings,
    VirtualFaceSettings,
    parse_face,
)
from anonymizer.streams import plan_streams
from anonymizer.video import VideoReader
from anonymizer.video_writer import VideoWriter, check_encode_settings, plan_timestamps
from anonymizer.virtual_face import build_virtual_face
from keepr.errors import KeeprError
from keepr.fileio import atomic_dir, sha256_file
from keepr.precision import autocast, tune_allocator
from keepr.registry import missing
from models.cosegmentation import PartSwapper, load_cosegmentation
from models.encoder import load_encoder
from models.stylegan2 import load_generator

__all__ = ["InferSettings", "Models", "load_models", "check_model_files", "check_input", "track_faces",
           "virtual_faces", "render_video", "anonymize_video", "Cancelled", "Scan"]


def check_model_files(paths: ModelPaths) -> dict:
    """Every model file must exist: MissingWeightsError naming the first missing one and where to get it."""
    out = {}
    for key in ("generator", "encoder", "cosegmentation", "cosegmentation_config"):
        p = getattr(paths, key)
        if not p or not Path(p).is_file():
            if key == "cosegmentation_config":
                raise KeeprError(f"{p}: co-part segmentation config not found (configs/cosegmentation/ has the "
                                 "official ones)")
            raise missing(key, p)
        out[key] = {"path": str(p), "sha256": sha256_file(p)}
    return out


@dataclass
class Models:
    G: object
    encoder: object
    coseg: object
    recognizer: object


def load_models(paths: ModelPaths, device: str = "cpu") -> Models:
    """The generator, encoder, co-part model and dlib recogniser, on ``device``."""

    tune_allocator()  # before the first large tensor: glibc keeps freed frames' memory instead of remapping it
    G = load_generator(paths.generator, device=device)
    enc = load_encoder(paths.encoder, paths.generator, device=device)
    coseg = load_cosegmentation(paths.cosegmentation, paths.cosegmentation_config, device=device)
    return Models(G=G, encoder=enc, coseg=coseg, recognizer=FaceRecognizer())


def check_parts(parts, coseg) -> None:
    for p in parts:
        if not 1 <= int(p) <= coseg.num_segments:
            raise KeeprError(f"swap part {p} out of range: the co-part model has segments 1..{coseg.num_segments}"
                             " (0 is the background)")


def virtual_faces(persons: list[Person], models: Models, settings: InferSettings,
                  watch: Stopwatch | None = None, seeds: dict[int, int] | None = None,
                  candidates: dict[int, int] | None = None) -> dict[int, object]:
    """One :class:`anonymizer.virtual_face.VirtualFace` per person (keyed by person id), from their best frame.

    Person k's candidates use seed ``settings.seed + k`` (or ``seeds[k]``), so the same person gets the same faces
    in every run; ``candidates[k]`` picks person k's candidate (default ``settings.virtual_face.candidate``).
    A person whose virtual face cannot be made (e.g. the identity guard finds no face in a tiny aligned crop, or
    every candidate stays a look-alike) maps to the one-line reason instead, a string: their faces get the fallback.
    """

    out: dict[int, object] = {}
    for p in persons:
        t0 = time.perf_counter()
        tr = p.best
        ox, oy = tr.best_offset
        vs = settings.virtual_face
        if candidates and p.id in candidates:
            vs = dataclasses.replace(vs, candidate=candidates[p.id])
        seed = seeds[p.id] if seeds and p.id in seeds else settings.seed + p.id
        try:
            with autocast(settings.swap.device, settings.swap.precision):
                out[p.id] = build_virtual_face(models, tr.best_image, tr.best_landmarks - np.array([ox, oy]), vs,
                                               seed=seed)
        except KeeprError as exc:
            out[p.id] = " ".join(str(exc).split())
        if watch is not None:
            watch.add("virtual_face", time.perf_counter() - t0)
    return out


def make_target(person: Person, vf, models: Models, settings: InferSettings, num_frames: int) -> Target:
    """A chosen person ready for pass 2: the co-part source crop of the virtual face and its part swapper."""

    s = settings
    img_size = int(models.coseg.img_size)
    tr = person.best
    ox, oy = tr.best_offset
    bx = tr.best_box
    src_box = crop_box((bx[0] - ox, bx[1] - oy, bx[2] - ox, bx[3] - oy), s.crop.scale, s.crop.shift_y)
    source_crop = crop_aligned(vf.image, vf.align_matrix, vf.align_size, src_box, img_size)
    swapper = PartSwapper(models.coseg, to_tensor([source_crop], s.swap.device), s.swap.parts, hard=s.swap.hard,
                          mask_from=s.swap.mask_from, batch_size=s.swap.batch_size, precision=s.swap.precision)
    timeline = person.timeline(num_frames, s.track.max_gap, s.track.hold, s.track.smooth_radius)
    return Target(person, timeline, vf, source_crop, swapper)


def tqdm_progress(enabled: bool = True) -> Progress:
    """A progress callback drawing one tqdm bar per stage on stderr."""

    bars: dict[str, object] = {}

    def update(stage: str, done: int, total: int | None) -> None:
        bar = bars.get(stage)
        if bar is None:
            for b in bars.values():
                b.close()
            bar = bars[stage] = tqdm(total=total, desc=stage, unit="frame", disable=not enabled, file=sys.stderr,
                                     dynamic_ncols=True, leave=True)
        bar.update(done - bar.n)
        if total is not None and done >= total:
            bar.close()

    return update


def warn(message: str) -> None:
    print(f"warning: {' '.join(message.split())}", file=sys.stderr)


@dataclass
class CheckedInput:
    """An input video and settings that passed every check that can be made before the work."""

    video: Path
    reader: VideoReader
    plan: object  # anonymizer.streams.StreamPlan
    model_files: dict
    settings: InferSettings


def check_input(video: str | os.PathLike, settings: InferSettings) -> CheckedInput:
    """Settings, input video, encoder settings, the plan for the input's other streams and the model files, checked
    before any work (KeeprError naming the cause); stream warnings are printed."""
    s = settings
    validate_settings(s)
    video = Path(video)
    reader = VideoReader(video)  # validates the input (missing, empty, corrupt, image, text...)
    check_encode_settings(reader.width, reader.height, reader.fps, crf=s.encode.crf, preset=s.encode.preset)
    plan = plan_streams(reader, s.encode.audio)
    for w in plan.warnings:
        warn(w)
    return CheckedInput(video, reader, plan, check_model_files(s.models), s)


def render_video(checked: CheckedInput, out_dir: str | os.PathLike, scan: Scan, selected: list[Person],
                 vfs: dict[int, object], models: Models, every_person: bool, command: list[str] | None = None,
                 progress: Progress | None = None, cancel: Callable[[], bool] | None = None,
                 watch: Stopwatch | None = None, out=None, t_start: float | None = None) -> dict:
    """Pass 2 and the report: ``selected`` persons swapped with their virtual faces ``vfs`` (a string instead of a
    face: the reason none could be made; such a person gets the fallback), every face checked for coverage.

    ``every_person``: faces of nobody's track are anonymized too (``--face all``). ``out``: an output already
    prepared with :func:`anonymizer.checks.prepared_output` (else it is prepared here). Returns the report.
    """
    s = checked.settings
    t_start = time.perf_counter() if t_start is None else t_start
    watch = watch or Stopwatch()
    if out is None:
        with prepared_output(out_dir) as prepared:
            return render_video(checked, out_dir, scan, selected, vfs, models, every_person, command, progress,
                                cancel, watch, prepared, t_start)
    reader = checked.reader
    check_parts(s.swap.parts, models.coseg)
    img_size = int(models.coseg.img_size)
    chosen = {p.id for p in selected}
    truncated = [reader.truncation_message()] if scan.truncation else []
    tb_out, pts_out = plan_timestamps([t for t, _ in scan.stamps], reader.fps, reader.time_base,
                                      [p for _, p in scan.stamps], reader.start_time)
    with atomic_dir(out.target) as tmp:
        failed = {pid: v for pid, v in vfs.items() if isinstance(v, str) and pid in chosen}
        for pid, why in failed.items():
            warn(f"person {pid}: no virtual face ({why}); their faces get the fallback ({s.fallback})")
        targets = [make_target(p, vfs[p.id], models, s, scan.num_frames) for p in selected if p.id not in failed]
        swapped = {t.person.id for t in targets}
        others = {p.id: p.timeline(scan.num_frames, s.track.max_gap, s.track.hold, s.track.smooth_radius)
                  for p in scan.persons if p.id not in swapped}
        ctx = CoverFrame(chosen=chosen, every_person=every_person,
                         descriptors={p.id: p.descriptor for p in scan.persons if p.descriptor is not None},
                         fallback=s.fallback, min_alpha=s.coverage.min_alpha, margin=s.coverage.margin,
                         identity=s.coverage.identity, recognizer=models.recognizer,
                         threshold=s.virtual_face.guard_threshold or 0.6, failed=failed)
        tally = CoverageTally(scan.persons, chosen, scan.detector["coverage"], ctx)
        out_video = tmp / "anonymized.mp4"
        with VideoWriter(out_video, reader.width, reader.height, reader.fps, time_base=tb_out,
                         start_time=reader.start_time, crf=s.encode.crf, preset=s.encode.preset,
                         threads=s.encode.threads, plan=checked.plan) as writer:
            render(reader, writer, scan, targets, others, pts_out, s, img_size, ctx, tally, watch=watch,
                   progress=progress, cancel=cancel)
        if reader.truncation and not truncated:
            truncated = [reader.truncation_message()]
            warn(truncated[0])
        report = build_report(
            video=checked.video, out_dir=out_dir, settings=s, command=command, reader=reader, plan=checked.plan,
            writer=writer, model_files=checked.model_files, models=models, scan=scan, selected=selected,
            targets=targets, tally=tally, watch=watch, out_video=out_video, tmp=tmp, truncated=truncated,
            failed=failed, seconds=time.perf_counter() - t_start)
        write_report(tmp / "report.json", report)

    cov = report["coverage"]
    if cov["left"]:
        frames = ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in cov["frames_with_faces_left"][:12])
        warn(f"{cov['left']} chosen face(s) left as they were in frame(s) {frames} (report.json: coverage)")
    if cov["identity_matches"]:
        warn(f"the original identity still matches (dlib) in {cov['identity_matches']} of {cov['identity_checked']} "
             "anonymized face(s) (report.json: coverage.persons[].identity_matches)")
    lost = report["totals"]["frames_face_lost"]
    if lost:
        warn(f"a chosen person was not tracked in {len(lost)} frame(s) inside their span (report.json: "
             "totals.frames_face_lost); the coverage pass handled the faces it found there")
    return report


def anonymize_video(video: str | os.PathLike, out_dir: str | os.PathLike, settings: InferSettings,
                    command: list[str] | None = None, progress: Progress | None = None,
                    cancel: Callable[[], bool] | None = None, models: Models | None = None) -> dict:
    """Anonymize ``video`` into ``out_dir`` (anonymized.mp4, candidates*.png, latent*.npy, report.json).

    The three steps in one call: :func:`check_input`, :func:`anonymizer.scan.track_faces`, :func:`virtual_faces`
    for the persons ``settings.face`` chooses, :func:`render_video`. Returns the report; ``report["complete"]`` is
    False when a chosen face was left uncovered or the input ended early (with ``settings.strict`` the caller must
    then fail: ``infer.py`` exits with status 2, the output stays). Raises KeeprError (nothing written at
    ``out_dir``) on bad input, missing weights, no face... ``models`` skips loading (a server keeps them loaded);
    ``progress(stage, done, total)`` and ``cancel()`` serve progress bars and cancelling.
    """
    t_start = time.perf_counter()
    s = settings
    validate_settings(s)
    with prepared_output(out_dir) as out:  # the lock first: a second run into the same place fails at once
        if out.removed:
            warn(f"removed {len(out.removed)} temporary output(s) of a killed run: "
                 + ", ".join(str(p) for p in out.removed))
        checked = check_input(video, s)
        which = parse_face(s.face)
        watch = Stopwatch()
        if progress is None:
            progress = tqdm_progress(s.progress)
        t0 = time.perf_counter()
        if models is None:
            models = load_models(s.models, s.swap.device)
        watch.add("load_models", time.perf_counter() - t0, 0)
        check_parts(s.swap.parts, models.coseg)

        scan = track_faces(checked.reader, s, models.recognizer, progress=progress, cancel=cancel, watch=watch)
        if scan.truncation:
            warn(checked.reader.truncation_message())
        if not scan.persons:
            raise KeeprError(no_face_message(scan, s))
        selected = select_persons(scan.persons, which, source=str(checked.video))
        vfs = virtual_faces(selected, models, s, watch)
        return render_video(checked, out_dir, scan, selected, vfs, models, every_person=which == "all",
                            command=command, progress=progress, cancel=cancel, watch=watch, out=out,
                            t_start=t_start)


def summary_line(report: dict, out_dir: str | os.PathLike) -> str:
    """The last line infer.py prints."""
    t = report["totals"]
    return (f"wrote {Path(out_dir) / 'anonymized.mp4'} ({t['frames']} frames, {len(report['persons']['selected'])} of "
            f"{report['persons']['found']} person(s) chosen; {one_line(report['coverage'])}; {t['fps']} frames/s); "
            f"report: {Path(out_dir) / 'report.json'}" + ("" if report["complete"] else " [INCOMPLETE]"))
