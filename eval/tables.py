"""The evaluation's outputs from its per-clip scores: the aggregate rows, results.csv, results.md and the plots.

Kept apart from the scoring (:mod:`eval.run`) so that a single process and a distributed run, which merges the
per-video scores of every rank, write the very same files.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from eval import coverage as C
from eval import metrics as M
from keepr.fileio import atomic_path

if TYPE_CHECKING:  # for the annotations only
    from eval.scoring import ClipFailure, ClipScore

COUNT_COLUMNS = ("frames_described", "pose_frames", "faces_seen", "faces_left")  # summed, not averaged, over videos
# Columns of results.md: (key in the result row, header, format).
TABLE_COLUMNS = [
    ("frames", "frames", "{:d}"),
    ("faces_left", "faces left ↓", "{:d}"),
    ("match_rate@0.6", "leak@0.6 ↓", "{:.1%}"),
    ("match_rate@0.5", "leak@0.5 ↓", "{:.1%}"),
    ("identity_distance_mean", "id dist ↑", "{:.3f}"),
    ("track_attack_match@0.6", "track leak ↓", "{:.0%}"),
    ("reid_top1", "re-id top-1 ↓", "{:.1%}"),
    ("detection_rate", "detected ↑", "{:.1%}"),
    ("descriptor_frechet", "desc. FD ↓", "{:.3f}"),
    ("landmark_nme", "lmk NME ↓", "{:.3f}"),
    ("yaw_error_deg", "yaw err° ↓", "{:.1f}"),
    ("pitch_error_deg", "pitch err° ↓", "{:.1f}"),
    ("warping_error", "warp err ↓", "{:.2f}"),
    ("flicker_excess", "flicker+ ↓", "{:.2f}"),
    ("identity_distance_spread", "id spread", "{:.3f}"),
    ("fid", "FID ↓", "{:.1f}"),
    ("kid", "KID ↓", "{:.4f}"),
    ("lpips", "LPIPS", "{:.3f}"),
    ("arcface_similarity", "ArcFace sim ↓", "{:.3f}"),
]


def aggregate(per_video: dict[str, dict[str, ClipScore]], methods: Sequence[str]) -> dict[str, dict]:
    """One row per method over all videos: frame-weighted means of the per-clip numbers."""
    out = {}
    for name in methods:
        rows = [clips[name].row for clips in per_video.values() if name in clips]
        if not rows:
            continue
        weights = np.array([r["frames"] for r in rows], dtype=np.float64)
        agg: dict = {"dataset": "ALL videos", "method": name, "frames": int(weights.sum())}
        keys = [k for k in rows[0] if k not in ("dataset", "method", "frames")]
        for k in keys:
            if k in COUNT_COLUMNS:
                agg[k] = int(sum(int(r.get(k) or 0) for r in rows))
                continue
            vals = [r.get(k) for r in rows]
            if k == "faces_left_frames":
                agg[k] = "; ".join(f"{r['dataset']}: {r[k]}" for r in rows if r.get(k))
                continue
            if any(isinstance(v, str) for v in vals):
                agg[k] = next(v for v in vals if isinstance(v, str))
                continue
            v = np.array([np.nan if x is None else x for x in vals], dtype=np.float64)
            ok = np.isfinite(v)
            agg[k] = float((v[ok] * weights[ok]).sum() / weights[ok].sum()) if ok.any() else float("nan")
        out[name] = agg
    return out


def _fmt(value, fmt: str) -> str:
    if value is None:
        return "–"
    if isinstance(value, str):
        return "n/a" if value.startswith("unavailable") else value
    if isinstance(value, float) and math.isnan(value):
        return "–"
    if fmt == "{:d}":
        return str(int(value))
    return fmt.format(value)


def markdown_table(summary: dict[str, dict], photo_rows: dict[str, dict], videos: Sequence[Path], photos_count: int,
                   failures: Sequence[ClipFailure] = ()) -> str:
    """The per-method results table (videos aggregated; re-id from the photos) with notes on unavailable metrics and
    the list of failed videos (left out of the table)."""
    cols = [c for c in TABLE_COLUMNS]
    lines = ["| method | " + " | ".join(h for _, h, _ in cols) + " |", "|---|" + "---:|" * len(cols)]
    notes = set()
    for name, row in summary.items():
        merged = dict(row)
        if name in photo_rows and "reid_top1" in photo_rows[name]:
            merged["reid_top1"] = photo_rows[name]["reid_top1"]
        for k, _, _ in cols:
            if isinstance(merged.get(k), str) and merged[k].startswith("unavailable"):
                notes.add(f"{k}: {merged[k]}")
        lines.append(f"| {name} | " + " | ".join(_fmt(merged.get(k), f) for k, _, f in cols) + " |")
    text = "\n".join(lines) + "\n"
    text += (
        f"\nVideos: {', '.join(v.name for v in videos)}; photos for re-identification: {photos_count}. "
        "faces left: faces the coverage detector (as in infer.py) finds in the original frames, anyone's, that the "
        "method left as they were (their inner box changed by less than "
        f"{C.MIN_CHANGE:g} grey levels; frames in results.csv, faces_left_frames): a method that leaves faces "
        "visible fails, whatever its other scores; "
        "leak@t: share of frames whose anonymized face is within dlib distance t of the original (an attacker that "
        "knows the face box); track leak: the same for descriptors averaged over each video; re-id top-1: London "
        "neutral photos, anonymized, whose nearest gallery photo is the same person; detected: dlib HOG finds the "
        "anonymized face (frames where it finds the original); desc. FD: Frechet distance of dlib descriptor sets; "
        "lmk NME / yaw / pitch: landmark and "
        "head-pose error against the original (detected faces only); warp err: Farneback-flow warping error (grey "
        "levels); flicker+: face brightness change not in the original (grey levels/frame); id spread: std of the "
        "per-frame identity distance; ArcFace sim: mean cosine similarity of ArcFace IR-SE-50 embeddings of the "
        "original and the anonymized face, aligned alike (pSp's identity similarity).\n"
    )
    for n in sorted(notes):
        text += f"\n- {n}"
    text += "\n" if notes else ""
    if failures:
        text += "\nFailed (left out of the table):\n"
        for f in failures:
            text += f"\n- {f.video.name}{'' if f.method is None else f' ({f.method})'}: {f.error}"
        text += "\n"
    return text


def write_csv(path: Path, rows: list[dict]) -> None:
    keys: list[str] = []
    for r in rows:
        keys.extend(k for k in r if k not in keys)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    with atomic_path(path, ".csv") as tmp:
        tmp.write_text(buf.getvalue())



def _save_figure(fig, path: Path) -> None:
    """Write a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt  # heavy (matplotlib): only in _save_figure()

    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)

def plot_results(out_dir: Path, summary: dict[str, dict], per_video: dict[str, dict[str, ClipScore]]) -> list[Path]:
    """leakage_vs_realism.png and identity_distance.png."""
    import matplotlib  # heavy (matplotlib): only in plot_results()

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy (matplotlib): only in plot_results()

    written = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for k, (name, row) in enumerate(summary.items()):
        x = row.get("match_rate@0.6", float("nan"))
        for ax, key, label in ((axes[0], "detection_rate", "face detection rate after anonymization ↑"),
                               (axes[1], "landmark_nme", "landmark NME vs original ↓ (detected faces)")):
            y = row.get(key, float("nan"))
            if isinstance(y, float) and not math.isnan(y) and not math.isnan(x):
                ax.scatter([x], [y], s=60)
                ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 6 + 11 * k))  # no overlap
            ax.set_xlabel("identity leakage: match rate @0.6 ↓")
            ax.set_ylabel(label)
    axes[0].set_xlim(-0.05, 1.05)
    axes[0].set_ylim(-0.05, 1.05)
    fig.suptitle("Leakage against realism per method (all videos)")
    fig.tight_layout()
    path = out_dir / "leakage_vs_realism.png"
    _save_figure(fig, path)
    written.append(path)

    n = max(1, len(per_video))
    fig, axes = plt.subplots(n, 1, figsize=(9, 2.8 * n), squeeze=False)
    for ax, (video, clips) in zip(axes[:, 0], per_video.items()):
        for name, clip in clips.items():
            ax.plot(np.arange(len(clip.distances)), clip.distances, label=name, lw=1.2)
        ax.axhline(M.SAME_PERSON_THRESHOLD, color="k", ls="--", lw=0.8)
        ax.axhline(M.STRICT_THRESHOLD, color="gray", ls=":", lw=0.8)
        ax.set_title(video)
        ax.set_xlabel("frame")
        ax.set_ylabel("dlib distance to original")
        ax.legend(fontsize=7, ncol=5)
    fig.tight_layout()
    path = out_dir / "identity_distance.png"
    _save_figure(fig, path)
    written.append(path)
    return written
