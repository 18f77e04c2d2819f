"""Anonymize many videos (and photos) on many devices: a folder or a list of inputs, split across ranks by Lightning.

    python -m anonymizer.batch --inputs DIR_OR_LIST --out OUT [--config configs/infer/default.yaml] [infer.py options]
        [--trainer.accelerator cpu|gpu] [--trainer.devices N] [--trainer.num_nodes M] [--trainer.strategy ddp]
        [--threads T]

``--inputs``: a folder (searched recursively, hidden entries and ``OUT`` skipped), one video or photo, or a list
file (one path a line; blank lines and ``#`` comments skipped; relative paths are relative to the list file).
Every option of ``infer.py`` (``--config``, ``--face``, ``--detect.upsample``, ...) applies to every input.

**Work split.** ``Trainer.predict`` runs over a dataset of input indices with :class:`WholeInputSampler`: the inputs
are ordered by their work (frames x pixels from the header; photos by pixels), largest first, and dealt round-robin
(rank r gets the r-th, (r+W)-th, ... of that order), so every rank gets whole inputs and the ranks finish at about
the same time. Each rank loads the models once (on its own device) and calls :func:`anonymizer.pipeline.anonymize_video`
(photos: :func:`anonymizer.photos.anonymize_image`) for each of its inputs.

**Outputs.** Input ``<root>/<dir>/<name>.<ext>`` goes to ``OUT/<dir>/<name>/`` (``anonymized.mp4``, candidates,
latents and ``report.json`` as ``infer.py`` writes them; a photo: ``anonymized.<ext>`` and ``report.json``), written
into a temporary directory renamed into place when complete, so ranks never write the same file and a killed run
leaves no half output. ``<root>`` is the ``--inputs`` folder (a list file: the deepest folder holding every input).
Where two inputs would share a folder (``a.mp4`` and ``a.mkv``, or ``a.mp4`` next to a folder ``a/``) both keep
their extension: ``OUT/<dir>/<name>_<ext>/``.

**Reruns.** An input whose output folder holds a ``report.json`` whose input sha256 is the input's is skipped (listed
as ``skipped``); the others are done. An output made from another version of the input (its sha256 differs) is
replaced; one made with other settings or models is a failure of that input (remove it or choose another ``--out``).
A failed input (a KeeprError: one line) is recorded and the others go on; a rerun tries it again.

**Summary.** Each rank writes one record per input (``OUT/.keepr-batch/records/``, atomically) and its busy time;
at the end rank 0 merges them into ``OUT/summary.json`` and ``OUT/summary.csv`` (atomically): every input with its
status (done / skipped / failed and the error), frames, persons found / chosen, faces anonymized (by swap / by
fallback) / left, seconds and output sha256; and each rank's busy time with the load balance (max / mean).
Exit status (every rank): 0 when every input is done or skipped, 1 when one failed (after the summary is written) or
on an error before any work (bad options, missing weights, no inputs).

**Determinism.** The output of an input depends only on it and the settings, not on the rank or the number of
processes, provided each rank uses the same number of torch threads (``--threads``, or OMP_NUM_THREADS: without
either, Lightning gives each of N local processes cores/N threads, and float reductions may then round
differently) and x264 picks the same number of encoder threads (it counts the CPUs the process may run on).
"""
from __future__ import annotations

import csv
import dataclasses
import datetime
import importlib.util
import io
import json
import logging
import os
import shutil
import sys
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm import tqdm

from anonymizer import cli as infer
from anonymizer.checks import validate_settings
from anonymizer.settings import parse_face
from keepr.errors import KeeprError, cli_main
from keepr.fileio import atomic_dir, sha256_file, write_text_atomic

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".mpg", ".mpeg", ".m4v", ".gif", ".ts", ".flv", ".wmv")
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
STATE_DIR = ".keepr-batch"
STATUSES = ("done", "skipped", "failed")
# Trainer options this tool sets itself.
_TRAINER_FIXED = {"logger", "callbacks", "enable_checkpointing", "use_distributed_sampler", "enable_model_summary",
                  "plugins", "profiler", "model_registry", "limit_predict_batches", "fast_dev_run",
                  "enable_progress_bar", "inference_mode", "max_epochs", "min_epochs", "max_steps", "min_steps",
                  "max_time", "limit_train_batches", "limit_val_batches", "limit_test_batches",
                  "val_check_interval", "check_val_every_n_epoch", "num_sanity_val_steps", "log_every_n_steps",
                  "accumulate_grad_batches", "gradient_clip_val", "gradient_clip_algorithm", "overfit_batches",
                  "reload_dataloaders_every_n_epochs", "barebones", "detect_anomaly", "default_root_dir"}
# Settings that do not change an output (left out when an existing output's settings are compared).
_NEUTRAL = {"progress", "strict"}
# Columns of summary.csv (summary.json holds the same per input, and the ranks).
COLUMNS = ("index", "input", "kind", "output", "status", "error", "rank", "frames", "persons_found",
           "persons_chosen", "faces_anonymized", "faces_by_swap", "faces_by_fallback", "faces_left", "complete",
           "seconds", "input_sha256", "output_sha256")
# Fields of a record that depend on the run (timings, which rank did it, what this run did), not on the output.
TIMING_FIELDS = ("seconds", "anonymize_seconds", "rank", "run")


def photos_supported() -> bool:
    """True when ``anonymizer.photos`` (anonymize_image) is installed alongside."""
    return importlib.util.find_spec("anonymizer.photos") is not None


# ------------------------------------------------------------------------------------------------------------------
# Inputs.


@dataclass
class Item:
    """One input: its position in the sorted list, where it is and where its output goes."""

    index: int
    path: str  # the input file
    rel: str  # '/'-separated path below the root
    out: str  # output folder, '/'-separated, relative to OUT
    kind: str  # 'video' or 'photo'
    work: float = 0.0  # frames x pixels (photos: pixels); 0 when the header cannot be read


def _suffixes() -> tuple[str, ...]:
    return VIDEO_SUFFIXES + (PHOTO_SUFFIXES if photos_supported() else ())


def _walk(folder: Path, exclude: Path | None) -> list[Path]:
    found = []
    suffixes = _suffixes()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and (exclude is None or Path(os.path.realpath(here / d)) != exclude))
        found += [here / f for f in filenames if not f.startswith(".") and Path(f).suffix.lower() in suffixes]
    return found


def _read_list(path: Path) -> list[Path]:
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise KeeprError(f"{path}: cannot read the list of inputs ({exc})") from None
    out = []
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        p = Path(line).expanduser()
        p = p if p.is_absolute() else path.parent / p
        if not p.is_file():
            raise KeeprError(f"{path}: line {n}: {line}: no such file")
        out.append(p)
    return out


def output_names(rels: Sequence[str]) -> list[str]:
    """Output folder (relative to OUT) of each input: its relative path without the extension, or with the
    extension as ``_<ext>`` where two inputs would otherwise share a folder or one folder would hold another."""
    plain = [rel.rsplit(".", 1)[0] if "." in Path(rel).name else rel for rel in rels]
    taken: dict[str, int] = {}
    for p in plain:
        taken[p] = taken.get(p, 0) + 1
    parents = {a.as_posix() for p in plain for a in list(Path(p).parents)[:-1]}  # folders holding outputs
    out = []
    for rel, p in zip(rels, plain):
        if taken[p] > 1 or p in parents:
            name = Path(rel).name
            stem, _, ext = name.rpartition(".")
            p = (Path(rel).parent / f"{stem}_{ext}").as_posix()
        out.append(p)
    if len(set(out)) != len(out):
        dup = next(o for o in out if out.count(o) > 1)
        raise KeeprError(f"two inputs would be written to the same output folder {dup}; rename one")
    return out


def input_work(path: Path, kind: str) -> float:
    """Frames x pixels of a video from its header (pixels of a photo); 0 when it cannot be read."""
    try:
        if kind == "photo":
            from PIL import Image  # heavy (PIL): only in input_work()

            with Image.open(path) as im:
                return float(im.width * im.height)
        from anonymizer.video import probe_video  # heavy (av): only in input_work()

        info = probe_video(path)
        frames = info.num_frames or (info.duration or 0.0) * float(info.fps) or 1
        return float(frames) * info.width * info.height
    except Exception:  # noqa: BLE001 (an unreadable input fails when its rank gets to it; here it only goes last)
        return 0.0


def collect_inputs(inputs: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                   measure: bool = True) -> tuple[Path, list[Item]]:
    """(root, items) of ``--inputs``: items sorted by relative path, with their output folders and their work."""
    src = Path(inputs)
    exclude = Path(os.path.realpath(out_dir)) if out_dir is not None else None
    if src.is_dir():
        root, files = src, _walk(src, exclude)
    elif src.is_file() and src.suffix.lower() in VIDEO_SUFFIXES + PHOTO_SUFFIXES:
        root, files = src.parent, [src]
    elif src.is_file():
        files = _read_list(src)
        dirs = [os.path.dirname(os.path.abspath(f)) for f in files]
        root = Path(os.path.commonpath(dirs)) if dirs else src.parent
    else:
        raise KeeprError(f"--inputs {inputs}: no such folder or file")
    if not files:
        raise KeeprError(f"--inputs {inputs}: no videos ({', '.join(s[1:] for s in _suffixes())}) found")
    root_abs = os.path.abspath(root)
    rels = sorted({Path(os.path.relpath(os.path.abspath(f), root_abs)).as_posix(): f for f in files}.items())
    for rel, f in rels:
        if rel.startswith("../"):
            raise KeeprError(f"{f}: outside the input root {root}")
        if f.suffix.lower() in PHOTO_SUFFIXES and not photos_supported():
            raise KeeprError(f"{f}: photos need anonymizer.photos, which is not installed")
    outs = output_names([r for r, _ in rels])
    items = []
    for k, ((rel, f), o) in enumerate(zip(rels, outs)):
        kind = "photo" if f.suffix.lower() in PHOTO_SUFFIXES else "video"
        items.append(Item(k, str(f), rel, o, kind, input_work(f, kind) if measure else 0.0))
    return root, items


def deal(items: Sequence[Item], world_size: int) -> list[list[int]]:
    """Indices of the items of each rank: largest work first (ties: input order), dealt round-robin."""
    order = sorted(range(len(items)), key=lambda i: (-items[i].work, items[i].index))
    return [[items[i].index for i in order[r::world_size]] for r in range(world_size)]


# ------------------------------------------------------------------------------------------------------------------
# One input.


def _one_line(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())
    if isinstance(exc, KeeprError):
        return msg or type(exc).__name__
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def _fingerprint(settings: dict) -> dict:
    d = {k: v for k, v in settings.items() if k not in _NEUTRAL and k != "models"}
    d["swap"] = {k: v for k, v in d.get("swap", {}).items() if k != "device"}
    return json.loads(json.dumps(d))


def _flat(d, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def existing_output(out: Path, input_sha: str, settings_fp: dict, model_files: dict) -> dict | None:
    """The report of a complete earlier output of this input at ``out`` (None: there is none, or it is of another
    version of the input and was removed). KeeprError when it was made with other settings or models."""
    report_path = out / "report.json"
    try:
        report = json.loads(report_path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict) or not isinstance(report.get("input"), dict):
        return None
    if report["input"].get("sha256") != input_sha:
        shutil.rmtree(out)  # the output of an earlier version of this input: redone
        return None
    a, b = _flat(_fingerprint(report.get("settings") or {})), _flat(settings_fp)
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    changed += sorted(f"models.{k}" for k, v in model_files.items()
                      if (report.get("models", {}).get(k) or {}).get("sha256") != v["sha256"])
    if changed:
        raise KeeprError(f"{out}: made with other settings or models (changed: {', '.join(changed[:6])}"
                         f"{', ...' if len(changed) > 6 else ''}); rerun with the same settings, or remove it or "
                         "choose another --out")
    video = report.get("output", {}).get("video") or report.get("output", {}).get("file")
    if not video or not (out / video).is_file():
        return None
    return report


def record_from_report(report: dict, kind: str) -> dict:
    """The summary fields of one output's report.json."""
    if kind == "photo":
        return {"frames": 1, "persons_found": report["persons_found"], "persons_chosen": len(report["chosen"]),
                "faces_anonymized": report["anonymized"], "faces_by_swap": report["by_swap"],
                "faces_by_fallback": report["by_fallback"], "faces_left": report["left"],
                "complete": report["complete"], "input_sha256": report["input"]["sha256"],
                "output_sha256": report["output"]["sha256"],
                "anonymize_seconds": report.get("seconds")}
    cov = report["coverage"]
    return {"frames": report["totals"]["frames"], "persons_found": report["persons"]["found"],
            "persons_chosen": len(report["persons"]["selected"]), "faces_anonymized": cov["anonymized"],
            "faces_by_swap": cov["by_swap"], "faces_by_fallback": cov["by_fallback"], "faces_left": cov["left"],
            "complete": report["complete"], "input_sha256": report["input"]["sha256"],
            "output_sha256": report["output"]["sha256"], "anonymize_seconds": report["totals"]["seconds"]}


def anonymize_photo(path: str, out_dir: Path, rel: str, settings, models, command: list[str] | None,
                    model_files: dict, input_sha: str) -> dict:
    """One photo into ``out_dir`` (``anonymized.<ext>`` and ``report.json``), atomically; returns the report."""

    from anonymizer.photos import anonymize_image, read_photo, write_photo  # heavy (cv2)

    t0 = time.perf_counter()
    photo = read_photo(path)
    rgb, info = anonymize_image(photo.rgb, settings, models, name=rel)
    name = "anonymized" + Path(path).suffix.lower()
    with atomic_dir(out_dir) as tmp:
        if info["faces"] == 0:
            shutil.copyfile(path, tmp / name)  # no face: the photo as it was
        else:
            write_photo(photo, rgb, tmp / name)
        report = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "command": command, "input": {"path": str(path), "sha256": input_sha},
                  "models": model_files, "settings": dataclasses.asdict(settings),
                  "output": {"dir": str(out_dir), "file": name, "sha256": sha256_file(tmp / name)},
                  **info, "seconds": round(time.perf_counter() - t0, 3)}
        (tmp / "report.json").write_text(json.dumps(report, indent=1))
    return report


def process_item(item: Item, out_root: Path, settings, get_models: Callable[[], Any], model_files: dict,
                 command: list[str] | None = None, progress=None) -> dict:
    """Do (or skip) one input; its record. Failures are recorded, never raised (KeyboardInterrupt aside)."""
    from anonymizer.pipeline import anonymize_video  # heavy (torch): only in process_item()

    t0 = time.perf_counter()
    rec: dict = {"index": item.index, "input": item.path, "kind": item.kind, "output": item.out, "status": "",
                 "error": ""}
    out = out_root / item.out
    try:
        try:
            input_sha = sha256_file(item.path)
        except OSError as exc:
            raise KeeprError(f"{item.path}: cannot read the input ({exc.strerror or exc})") from None
        report = existing_output(out, input_sha, _fingerprint(dataclasses.asdict(settings)), model_files)
        if report is not None:
            rec["status"] = "skipped"
        else:
            if item.kind == "photo":
                report = anonymize_photo(item.path, out, item.rel, settings, get_models(), command, model_files,
                                         input_sha)
            else:
                report = anonymize_video(item.path, out, settings, command=command, progress=progress,
                                         models=get_models())
            rec["status"] = "done"
        rec.update(record_from_report(report, item.kind))
    except Exception as exc:  # noqa: BLE001 (one input's failure, whatever it is, must not stop the others)
        rec.update(status="failed", error=_one_line(exc))
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    return rec


# ------------------------------------------------------------------------------------------------------------------
# Records and the summary.


def _write_json(dest: Path, data) -> None:
    write_text_atomic(dest, json.dumps(data, indent=1) + "\n")


def merge_summary(out_root: Path, items: Sequence[Item], run_id: str, world_size: int, wall_seconds: float,
                  inputs: str) -> dict:
    """Merge the records and rank files of run ``run_id`` into summary.json / summary.csv (atomically)."""

    state = out_root / STATE_DIR
    records = []
    for it in items:
        try:
            rec = json.loads((state / "records" / f"{it.index:06d}.json").read_text())
        except (OSError, ValueError):
            rec = None
        if not isinstance(rec, dict) or rec.get("run") != run_id:
            rec = {"index": it.index, "input": it.path, "kind": it.kind, "output": it.out, "status": "failed",
                   "error": "no record: the rank that had this input stopped before it"}
        records.append({k: v for k, v in rec.items() if k != "run"})
    ranks = []
    for r in range(world_size):
        try:
            info = json.loads((state / "ranks" / f"{r}.json").read_text())
        except (OSError, ValueError):
            info = {}
        if info.get("run") != run_id:
            info = {"rank": r, "inputs": 0, "frames": 0, "busy_seconds": None}
        ranks.append({k: v for k, v in info.items() if k != "run"})
    busy = [r["busy_seconds"] for r in ranks if r.get("busy_seconds") is not None]
    mean = sum(busy) / len(busy) if busy else 0.0
    counts = {s: sum(r["status"] == s for r in records) for s in STATUSES}
    frames = sum(int(r.get("frames") or 0) for r in records if r["status"] == "done")
    summary = {
        "inputs": str(inputs), "out": str(out_root), "world_size": world_size, "total": len(records), **counts,
        "frames_done": frames, "seconds": round(wall_seconds, 3),
        "videos_per_second": round(counts["done"] / wall_seconds, 4) if wall_seconds > 0 else None,
        "frames_per_second": round(frames / wall_seconds, 3) if wall_seconds > 0 else None,
        "load_balance": round(max(busy) / mean, 4) if busy and mean > 0 else None,
        "ranks": ranks, "records": records,
    }
    _write_json(out_root / "summary.json", summary)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COLUMNS) + ["busy_seconds"], extrasaction="ignore")
    w.writeheader()
    for r in records:
        w.writerow({k: r.get(k, "") for k in COLUMNS})
    for r in ranks:
        w.writerow({"input": f"(rank {r['rank']})", "rank": r["rank"], "frames": r.get("frames", 0),
                    "busy_seconds": r.get("busy_seconds")})
    write_text_atomic(out_root / "summary.csv", buf.getvalue())
    return summary


# ------------------------------------------------------------------------------------------------------------------
# Progress.


class RankProgress:
    """One bar per rank (``position`` = local rank): inputs done of the rank's share, inputs/s and frames/s."""

    def __init__(self, rank: int, position: int, total: int, enabled: bool):
        self.bar = tqdm(total=total, desc=f"rank {rank}", unit="video", position=position, leave=True,
                        disable=not enabled, file=sys.stderr, dynamic_ncols=True)
        self.t0 = time.perf_counter()
        self.frames = 0
        self.current = 0
        self.last = 0.0

    def _postfix(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.last < 0.5:
            return
        self.last = now
        fps = (self.frames + self.current) / max(now - self.t0, 1e-9)
        self.bar.set_postfix_str(f"{self.frames + self.current} frames, {fps:.2f} frames/s")

    def stage(self, stage: str, done: int, total: int | None) -> None:
        """The progress callback of anonymize_video: frames rendered count."""
        if stage == "render":
            self.current = done
            self._postfix()

    def input_done(self, frames: int) -> None:
        self.frames += frames
        self.current = 0
        self._postfix(force=True)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


# ------------------------------------------------------------------------------------------------------------------
# Lightning.


def _lightning():
    import pytorch_lightning as pl  # heavy (lightning): only in _lightning()
    import torch  # heavy (torch): only in _lightning()
    from torch.utils.data import Dataset, Sampler  # heavy (torch): only in _lightning()

    class InputsDataset(Dataset):
        def __init__(self, n: int):
            self.n = n

        def __len__(self) -> int:
            return self.n

        def __getitem__(self, i: int) -> int:
            return int(i)

    class WholeInputSampler(Sampler):
        """This rank's inputs: whole inputs, largest first, dealt round-robin (:func:`deal`)."""

        def __init__(self, items: Sequence[Item], rank: int, world_size: int):
            self.indices = deal(items, world_size)[rank]

        def __iter__(self):
            return iter(self.indices)

        def __len__(self) -> int:
            return len(self.indices)

    class BatchAnonymizer(pl.LightningModule):
        """Each rank: load the models once (lazily: a rank whose inputs are all done loads nothing), process its
        inputs, write their records; at the end (every rank) rank 0 merges the summary."""

        def __init__(self, items, out_root: Path, settings, model_files: dict, command, inputs: str,
                     threads: int | None, show_progress: bool, t_start: float):
            super().__init__()
            self.items, self.out_root, self.settings = items, out_root, settings
            self.model_files, self.command, self.inputs = model_files, command, inputs
            self.threads, self.show_progress, self.t_start = threads, show_progress, t_start
            self._models = None
            self.run_id = ""
            self.busy = 0.0
            self.frames = 0
            self.done_inputs = 0
            self.progress: RankProgress | None = None
            self.summary: dict | None = None
            self.status = 1

        def setup(self, stage: str) -> None:
            trainer = self.trainer
            if self.threads:
                torch.set_num_threads(int(self.threads))
            self.run_id = trainer.strategy.broadcast(uuid.uuid4().hex if trainer.global_rank == 0 else "", src=0)
            if trainer.global_rank == 0:
                for sub in ("records", "ranks"):
                    (self.out_root / STATE_DIR / sub).mkdir(parents=True, exist_ok=True)
            trainer.strategy.barrier("keepr-batch-setup")

        def predict_dataloader(self):
            from torch.utils.data import DataLoader  # heavy (torch): only in _lightning()

            t = self.trainer
            sampler = WholeInputSampler(self.items, t.global_rank, t.world_size)
            self.progress = RankProgress(t.global_rank, t.local_rank, len(sampler), self.show_progress)
            return DataLoader(InputsDataset(len(self.items)), batch_size=None, sampler=sampler, num_workers=0)

        def models(self):
            if self._models is None:
                from anonymizer.pipeline import load_models  # heavy (torch): only in _lightning()

                self._models = load_models(self.settings.models, self.settings.swap.device)
            return self._models

        def predict_step(self, batch, batch_idx: int):
            t0 = time.perf_counter()
            item = self.items[int(batch)]
            self.settings.swap.device = str(self.device)
            rec = process_item(item, self.out_root, self.settings, self.models, self.model_files, self.command,
                               progress=self.progress.stage if self.progress else None)
            rec.update(rank=self.trainer.global_rank, run=self.run_id)
            _write_json(self.out_root / STATE_DIR / "records" / f"{item.index:06d}.json", rec)
            if rec["status"] == "failed":
                error = rec["error"] if item.path in rec["error"] else f"{item.path}: {rec['error']}"
                message = f"warning: {error}; going on with the others"
                if self.progress is not None:
                    self.progress.bar.write(message, file=sys.stderr)
                else:
                    print(message, file=sys.stderr)
            frames = int(rec.get("frames") or 0) if rec["status"] == "done" else 0
            self.frames += frames
            self.done_inputs += 1
            if self.progress is not None:
                self.progress.input_done(frames)
            self.busy += time.perf_counter() - t0
            return None

        def teardown(self, stage: str) -> None:
            trainer = self.trainer
            if self.progress is not None:
                self.progress.close()
            _write_json(self.out_root / STATE_DIR / "ranks" / f"{trainer.global_rank}.json",
                        {"rank": trainer.global_rank, "inputs": self.done_inputs, "frames": self.frames,
                         "busy_seconds": round(self.busy, 3), "run": self.run_id})
            trainer.strategy.barrier("keepr-batch-merge")
            status, error = 1, ""
            if trainer.global_rank == 0:
                try:
                    self.summary = merge_summary(self.out_root, self.items, self.run_id, trainer.world_size,
                                                 time.perf_counter() - self.t_start, self.inputs)
                    status = 1 if self.summary["failed"] else 0
                except KeeprError as exc:
                    error = _one_line(exc)
            self.status, error = trainer.strategy.broadcast((status, error), src=0)
            if error:
                raise KeeprError(error)

    return InputsDataset, WholeInputSampler, BatchAnonymizer


# ------------------------------------------------------------------------------------------------------------------
# Command line.


def build_parser():
    """infer.py's parser (every settings option, --config) plus --inputs, --threads and the Trainer options."""
    from pytorch_lightning import Trainer  # heavy (lightning): only in build_parser()

    p = infer.build_parser()
    p.prog = "python -m anonymizer.batch"
    p.description = __doc__.split("\n\n")[0]
    for a in p._actions:  # --video / --images are infer.py's inputs; here --inputs is
        if a.dest in ("video", "images"):
            a.required = False
            a.help = "(infer.py only; use --inputs)"
    p.add_argument("--inputs", type=str, required=True,
                   help="a folder (searched recursively), a video or photo, or a list file (one path a line)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per rank (0: Lightning's choice, cores / local processes, unless "
                        "OMP_NUM_THREADS is set); the same value on every run keeps outputs byte-identical")
    p.add_class_arguments(Trainer, "trainer", skip=_TRAINER_FIXED, instantiate=False, fail_untyped=False)
    return p


def trainer_kwargs(cfg) -> dict:
    kw = {k: v for k, v in dict(cfg.trainer).items() if k not in _TRAINER_FIXED}
    kw.update(logger=False, enable_checkpointing=False, use_distributed_sampler=False, enable_model_summary=False,
              enable_progress_bar=False, inference_mode=False)
    return kw


def run(argv: Sequence[str] | None = None) -> tuple[int, dict | None]:
    """Parse, check, run; (exit status, summary on rank 0 or None)."""
    t_start = time.perf_counter()
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = build_parser().parse_args(argv)
    if getattr(cfg, "video", None) or getattr(cfg, "images", None):
        raise KeeprError("--video/--images are infer.py's; give the inputs with --inputs")
    if cfg.threads < 0:
        raise KeeprError(f"--threads must be >= 0, got {cfg.threads}")
    from anonymizer.pipeline import check_model_files  # heavy (torch): only in run()

    settings = infer.settings_from_args(cfg)
    validate_settings(settings)
    parse_face(settings.face)
    model_files = check_model_files(settings.models)  # missing weights: one line, before any work
    out_root = Path(cfg.out)
    if out_root.exists() and not out_root.is_dir():
        raise KeeprError(f"--out {out_root}: exists and is not a folder")
    _, items = collect_inputs(cfg.inputs, out_root)
    for name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)

    import pytorch_lightning as pl  # heavy (lightning): only in run()

    _, _, BatchAnonymizer = _lightning()
    trainer = pl.Trainer(**trainer_kwargs(cfg))
    module = BatchAnonymizer(items, out_root, settings, model_files, ["python -m anonymizer.batch", *argv],
                             cfg.inputs, cfg.threads, bool(settings.progress), t_start)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(does not have many workers|Total length of `DataLoader`"
                                "|GPU available but not used|predict_dataloader|predict returned None|LeafSpec).*")
        trainer.predict(module, return_predictions=False)
    if trainer.global_rank == 0 and module.summary is not None:
        s = module.summary
        print(f"{s['total']} input(s): {s['done']} done, {s['skipped']} skipped (already done), {s['failed']} "
              f"failed; {s['frames_done']} frames in {s['seconds']} s ({s['videos_per_second']} videos/s, "
              f"{s['frames_per_second']} frames/s, {s['world_size']} rank(s), load balance {s['load_balance']}); "
              f"summary: {out_root / 'summary.json'}, {out_root / 'summary.csv'}")
        if s["failed"]:
            failed = [r for r in s["records"] if r["status"] == "failed"]
            first = failed[0]["error"] if failed[0]["input"] in failed[0]["error"] else \
                f"{failed[0]['input']}: {failed[0]['error']}"
            print(f"error: {len(failed)} of {s['total']} input(s) failed, e.g. {first} (all in "
                  f"{out_root / 'summary.csv'})", file=sys.stderr)
    return module.status, module.summary


@cli_main
def main(argv: Sequence[str] | None = None) -> dict | None:
    status, summary = run(argv)
    if status:
        raise SystemExit(status)
    return summary


if __name__ == "__main__":
    main()
