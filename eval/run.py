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
import logging
import pickle
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from anonymizer.batch import Item, deal, input_work
from anonymizer.checks import validate_settings
from eval import metrics as M
from eval.baselines import keepr_settings, parse_methods
from eval.scoring import (
    ClipFailure,
    ClipScore,
    arcface_recognizer,
    describe_photos,
    evaluate_photos,
    evaluate_video,
    failure_message,
    photo_identity,
    warn_failure,
)
from eval.tables import aggregate, markdown_table, plot_results, write_csv
from keepr.errors import KeeprError, cli_main
from keepr.fileio import atomic_path

VIDEO_SUFFIXES = {".mp4", ".mpg", ".mpeg", ".mkv", ".avi", ".mov", ".gif", ".webm"}
PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}



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


@dataclass
class EvalResult:
    rows: list[dict]  # everything written to results.csv
    summary: dict[str, dict]  # per-method aggregate over videos
    photo_rows: dict[str, dict]
    per_video: dict[str, dict[str, ClipScore]]
    table: str  # results.md
    files: list[Path]
    failures: list[ClipFailure] = field(default_factory=list)  # videos (or methods on them) that failed


def video_result(v: Path, settings: EvalSettings, measurer: M.FaceMeasurer,
                 gallery: tuple[np.ndarray, list[str]] | None) -> tuple[dict[str, ClipScore], list[ClipFailure],
                                                                      list[dict]]:
    """One video: (scores per method, failures, its results.csv rows in the order of the methods)."""
    failures: list[ClipFailure] = []
    try:
        scores = evaluate_video(v, settings, measurer, gallery, failures=failures)
    except KeeprError as exc:  # the video itself: unreadable, no face...
        failures.append(ClipFailure(v, None, failure_message(v, exc)))
        warn_failure(failures[-1])
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
        arcface_recognizer(str(settings.arcface))  # missing or unreadable weights: one-line error before any work
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
