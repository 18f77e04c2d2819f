"""``report.json``: what was done to a video, frame by frame, and what it took.

Sections: ``input`` (file, hash, video properties, rotation, truncation, every stream and what happened to it),
``models`` (files and hashes), ``settings``, ``output``, ``persons`` (found, chosen, each chosen person's virtual
face), ``tracks``, ``coverage`` (:mod:`anonymizer.coverage`), ``frames`` (per frame: timings, tracked boxes, the
coverage pass's faces and what was done to each) and ``totals``. ``complete`` is False when a chosen face was
left as it was or the input ended early; ``incomplete`` says why.
"""
from __future__ import annotations

import datetime
import json
import platform
from dataclasses import asdict
from pathlib import Path

from anonymizer.crop import crop_box
from keepr.fileio import sha256_file

REPORT_VERSION = 2


def _person_entry(p) -> dict:
    return {"person": p.id, "tracks": list(p.track_ids), "first_frame": p.first_index, "last_frame": p.last_index,
            "detected_frames": p.num_detections}


def build_report(*, video, out_dir, settings, command, reader, plan, writer, model_files, models, scan, selected,
                 targets, tally, watch, out_video: Path, tmp: Path, truncated: list[str], seconds: float,
                 failed: dict | None = None) -> dict:
    """Assemble the report of one run (files are referred to by name inside the output directory)."""
    import torch  # heavy (torch): only in build_report()

    from anonymizer.virtual_face import save_virtual_face  # heavy (torch): only in build_report()

    s = settings
    frames_report = scan.frames_report
    for rec in frames_report:
        rec["faces"] = []
    for tgt in targets:
        for tbx in tgt.timeline:
            entry = {"person": tgt.person.id, **tbx.as_dict()}
            if tbx.box is not None:
                entry["crop"] = crop_box(tbx.box, s.crop.scale, s.crop.shift_y).as_list()
            frames_report[tbx.index]["faces"].append(entry)

    anonymized = []
    for tgt in targets:
        p, vf = tgt.person, tgt.virtual
        suffix = "" if len(targets) == 1 else f"_{p.id}"
        files = save_virtual_face(vf, tmp, suffix)
        best = p.best
        anonymized.append({**_person_entry(p), "best_frame": best.best_index,
                           "best_box": [round(v, 2) for v in best.best_box],
                           "virtual_face": {**vf.report, "files": files}})

    coverage = tally.summary()
    lost = sorted({tbx.index for tgt in targets for tbx in tgt.timeline if tbx.status == "lost"
                   and any(t.first_index <= tbx.index <= t.last_index for t in tgt.person.tracks)})
    status_counts: dict[str, int] = {}
    for r in frames_report:
        for e in r["faces"]:
            status_counts[e["status"]] = status_counts.get(e["status"], 0) + 1
    left_frames = {a for a, b in coverage["frames_with_faces_left"] for a in range(a, b + 1)}
    done_frames = {r["index"] for r in frames_report if any(c["result"] in ("swap", "fallback")
                                                            for c in r.get("coverage", []))}
    incomplete = []
    if coverage["left"]:
        incomplete.append(f"{coverage['left']} chosen face(s) left as they were")
    incomplete += truncated
    num_frames = scan.num_frames
    return {
        "keepr": {"report_version": REPORT_VERSION, "python": platform.python_version(), "torch": torch.__version__},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "complete": not incomplete,
        "incomplete": incomplete,
        "input": {"path": str(video), "sha256": sha256_file(video), "video": reader.info.as_dict(),
                  "rotation": reader.rotation, "truncation": scan.truncation or reader.truncation,
                  "streams": plan.as_list()},
        "models": {**model_files, "cosegmentation_img_size": int(models.coseg.img_size),
                   "cosegmentation_num_segments": int(models.coseg.num_segments)},
        "settings": asdict(s),
        "output": {"dir": str(out_dir), "video": "anonymized.mp4", "sha256": sha256_file(out_video),
                   "width": reader.width, "height": reader.height,
                   "fps": f"{reader.fps.numerator}/{reader.fps.denominator}",
                   "time_base": f"{writer.time_base.numerator}/{writer.time_base.denominator}",
                   "num_frames": writer.frames_written, "audio": writer.audio_summary(), "rotation": 0},
        "persons": {"found": len(scan.persons), "selected": [p.id for p in selected],
                    "all": [{**_person_entry(p), "chosen": p in selected} for p in scan.persons],
                    "anonymized": anonymized,
                    "without_virtual_face": [{"person": k, "why": v} for k, v in sorted((failed or {}).items())]},
        "tracks": {"found": sum(len(p.tracks) for p in scan.persons), "rejected": [
            {"first_frame": t.first_index, "last_frame": t.last_index, "detected_frames": len(t.detections)}
            for t in scan.rejected], "detections_added_by_coverage": scan.extended,
            "boxes_inferred_between_loose_detections": scan.loose},
        "detector": scan.detector,
        "coverage": coverage,
        "frames": frames_report,
        "totals": {
            "frames": num_frames,
            "frames_with_faces": coverage["frames_with_faces"],
            "frames_anonymized": len(done_frames - left_frames),
            "frames_passed_through": sorted(left_frames),
            "frames_face_lost": lost,
            "face_status_counts": status_counts,
            "seconds": round(seconds, 3),
            "fps": round(num_frames / seconds, 3) if seconds > 0 else None,
            "stages": watch.summary(),
        },
    }


def write_report(path: Path, report: dict) -> None:
    Path(path).write_text(json.dumps(report, indent=1))
