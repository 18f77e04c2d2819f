"""Pass 2: part swap, paste back, coverage check and fallback, frame by frame, into the output video.

For each frame, ``batch_size`` frames at a time: every chosen person with a tracked box there is cropped with the
co-part framing (:mod:`anonymizer.crop`), part-swapped with their virtual face (``models.cosegmentation.
PartSwapper``) and pasted back with a feathered mask (:mod:`anonymizer.blend`). Then every face the coverage pass
found in the frame is judged (:func:`anonymizer.coverage.cover_frame`): covered by a swap, given the fallback,
kept by choice, or left and reported. The frame is encoded (:class:`anonymizer.video_writer.VideoWriter`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from anonymizer.blend import feather_mask, paste
from anonymizer.coverage import CoverageTally, CoverFrame, SwapRegion, cover_frame
from anonymizer.crop import crop_box, crop_frame, crop_matrix
from anonymizer.scan import Cancelled, Progress, Scan, Stopwatch
from anonymizer.settings import InferSettings
from anonymizer.tracking import iou
from anonymizer.video import VideoReader
from anonymizer.video_writer import VideoWriter
from keepr.errors import KeeprError


@dataclass
class Target:
    """One chosen person: their per-frame boxes, virtual face and part swapper."""

    person: object  # anonymizer.persons.Person
    timeline: list  # TrackedBox per frame
    virtual: object  # anonymizer.virtual_face.VirtualFace
    source_crop: np.ndarray
    swapper: object  # models.cosegmentation.PartSwapper


def to_tensor(images: list[np.ndarray], device):
    """uint8 RGB [N][H,W,3] -> float [N,3,H,W] in [0,1] (the co-part models' input)."""
    import torch  # heavy (torch): only in to_tensor()

    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255.0)
    return x.to(device)


def to_uint8(x) -> np.ndarray:
    return x.clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def faces_to_check(found: list[tuple], idx: int, ctx: CoverFrame, others: dict[int, list]) -> list[tuple]:
    """The coverage pass's faces of frame ``idx`` plus the tracked boxes (marked inferred) of chosen persons without a
    virtual face where no face was found: the fallback covers them between detections too."""
    faces = list(found)
    for pid in ctx.failed:
        line = others.get(pid)
        box = line[idx].box if line is not None else None
        if box is not None and all(iou(f[:4], box) < 0.3 for f in faces):
            faces.append((*box, 0.0, True))
    return faces


def render(reader: VideoReader, writer: VideoWriter, scan: Scan, targets: list[Target], others: dict[int, list],
           pts_out: list[int], settings: InferSettings, img_size: int, ctx: CoverFrame, tally: CoverageTally,
           watch: Stopwatch | None = None, progress: Progress | None = None,
           cancel: Callable[[], bool] | None = None) -> None:
    """Pass 2 over ``reader`` into ``writer``. ``others`` maps the ids of persons without a swap (not chosen, or no
    virtual face) to their timelines: the coverage check must know where they are. Fills ``scan.frames_report`` with
    per-frame timings, faces and coverage results, and ``tally`` with the coverage figures."""
    import torch  # heavy (torch): only in render()

    s = settings
    watch = watch or Stopwatch()
    frames_report = scan.frames_report
    bs = max(1, s.swap.batch_size)
    masks_needed = s.blend.mask == "parts"
    crop_only_mask = feather_mask(None, img_size, border=s.blend.border)
    batch: list = []
    done = 0

    def flush():
        nonlocal done
        if not batch:
            return
        outs = [b[0].copy() for b in batch]
        regions: list[list[SwapRegion]] = [[] for _ in batch]
        for ti, tgt in enumerate(targets):
            items = [(k, b[1][ti]) for k, b in enumerate(batch) if b[1][ti] is not None]
            if not items:
                continue
            t0 = time.perf_counter()
            x = to_tensor([c[0] for _, c in items], s.swap.device)
            with torch.no_grad():
                if masks_needed:
                    y, m = tgt.swapper(x, return_mask=True)
                    m = m[:, 0].float().cpu().numpy()
                else:
                    y, m = tgt.swapper(x), None
            swapped = to_uint8(y)
            dt = time.perf_counter() - t0
            watch.add("swap", dt, len(items))
            for j, (k, (_, inv, fwd)) in enumerate(items):
                t1 = time.perf_counter()
                mask = feather_mask(m[j], img_size, s.blend.dilate, s.blend.blur, s.blend.border) if m is not None \
                    else crop_only_mask
                paste(outs[k], swapped[j], inv, mask, out=outs[k])
                regions[k].append(SwapRegion(tgt.person.id, fwd, mask))
                dp = time.perf_counter() - t1
                watch.add("paste", dp)
                tm = frames_report[batch[k][2]]["timing_ms"]
                tm["swap"] = round(tm.get("swap", 0.0) + dt / len(items) * 1e3, 2)
                tm["paste"] = round(tm.get("paste", 0.0) + dp * 1e3, 2)
        for k, out in enumerate(outs):
            image, _, idx = batch[k]
            t0 = time.perf_counter()
            boxes = {tgt.person.id: tgt.timeline[idx].box for tgt in targets if tgt.timeline[idx].box is not None}
            boxes.update({pid: line[idx].box for pid, line in others.items() if line[idx].box is not None})
            faces = faces_to_check(scan.faces[idx], idx, ctx, others)
            results = cover_frame(ctx, image, out, faces, boxes, regions[k],
                                  check_identity=idx % s.coverage.identity_every == 0)
            tally.add(idx, results)
            frames_report[idx]["coverage"] = results
            dc = time.perf_counter() - t0
            watch.add("coverage", dc, len(results))
            frames_report[idx]["timing_ms"]["coverage"] = round(dc * 1e3, 2)
            t0 = time.perf_counter()
            writer.write(out, pts_out[idx])
            de = time.perf_counter() - t0
            watch.add("encode", de)
            frames_report[idx]["timing_ms"]["encode"] = round(de * 1e3, 2)
        done += len(batch)
        if progress is not None:
            progress("render", done, len(pts_out))
        batch.clear()

    t_dec = time.perf_counter()
    for f in reader:
        watch.add("decode", time.perf_counter() - t_dec)
        if cancel is not None and cancel():
            raise Cancelled(f"{reader.path}: cancelled")
        if f.index >= len(pts_out):
            raise KeeprError(f"{reader.path}: decoded more frames on the second pass than on the first")
        crops = []
        t0 = time.perf_counter()
        for tgt in targets:
            tb = tgt.timeline[f.index]
            if tb.box is None:
                crops.append(None)
                continue
            cb = crop_box(tb.box, s.crop.scale, s.crop.shift_y)
            crop, inv = crop_frame(f.image, cb, img_size)
            crops.append((crop, inv, crop_matrix(cb, img_size)))
        dc = time.perf_counter() - t0
        if any(c is not None for c in crops):
            watch.add("crop", dc, sum(c is not None for c in crops))
            frames_report[f.index]["timing_ms"]["crop"] = round(dc * 1e3, 2)
        batch.append((f.image, crops, f.index))
        if len(batch) >= bs:
            flush()
        t_dec = time.perf_counter()
    flush()
    if writer.frames_written != len(pts_out):
        raise KeeprError(f"{reader.path}: the second pass decoded {writer.frames_written} frames, the first "
                         f"{len(pts_out)}; the file may be damaged or changed while it was read")
