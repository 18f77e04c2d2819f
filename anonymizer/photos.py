"""Photos: every chosen face of a still image replaced by a virtual face, with the same stages as a video frame.

A photo is a one-frame video. Each face the tracking detector finds becomes one :class:`anonymizer.tracking.Track`
with one detection (its best image is the photo around the face) and one :class:`anonymizer.persons.Person`
(:func:`anonymizer.persons.link_persons`, which also computes the dlib descriptors the coverage check compares
with). For every chosen person:

1. virtual face: FFHQ alignment, the encoder, candidates with the identity guard, choice, skin match (what
   :func:`anonymizer.virtual_face.build_virtual_face` does, here batched: see below);
2. part swap with the photo as the driving frame (the co-part source crop and cache of
   :func:`anonymizer.pipeline.make_target`), paste back (:func:`anonymizer.blend.feather_mask`, :func:`paste`);
3. coverage: every face the coverage detector finds is judged by :func:`anonymizer.coverage.cover_frame` (swap,
   fallback, kept by choice, or left and reported).

**Batching.** :func:`anonymize_batch` takes several photos: the encoder runs once over all their aligned faces, the
generator synthesises the first draw of every face's candidates in one call, and the part swap runs over all faces
at once, each face paired with its own virtual face (a :class:`models.cosegmentation.part_swap.SourceCache` stacked
from the per-face caches of ``make_target``'s swappers; ``CoPartModel.swap_batch`` takes source entries of batch N
as well as 1). Batches are ``swap.batch_size`` faces (``swap.batch_size * num_candidates`` images for the
generator). Identity-guard redraws and the dlib work stay per face. Float results of a batched network may depend on
what else is in the batch (kernel choice, blocking), so the folder runner groups photos into fixed groups of
``swap.batch_size`` photos of the sorted file list: a resumed run recomputes a partly done group whole and writes
only what is missing, and every output is byte-identical to an uninterrupted run's.

**Seeds.** Face k (persons sorted by size) of the photo at relative path ``name`` uses seed
:func:`face_seed` (settings.seed, name, k): a sha256, not Python's ``hash()``, so the same photo gets the same
virtual faces in every run and on every machine.

**Folders** (:func:`anonymize_images`, ``infer.py --images PATH``): a file, or a folder searched recursively for
jpg/jpeg/png/webp/bmp. Outputs mirror the input tree under ``--out`` in the same format (extension) and size, EXIF
orientation applied (the pixels are turned, no orientation tag is written; other EXIF metadata, which may hold GPS
positions and camera serials, is not copied; an ICC profile is kept), PNG/WebP/BMP alpha kept (the swap is pasted
onto the colour channels), grayscale kept grayscale. A photo without a face is copied byte for byte. An unreadable
file is listed with its one-line error and the run goes on. Each output is written atomically
(:func:`keepr.fileio.atomic_path`), then its record ``OUT/.keepr/<relpath>.json``; a rerun into the same ``--out``
skips photos whose record and output exist and whose input is unchanged (sha256), so an interrupted folder resumes.
``OUT/.keepr/run.json`` holds the settings and model hashes: a rerun with other settings is refused. ``report.json``
is rebuilt from the records at the end of each run.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import platform
import re
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from anonymizer.blend import feather_mask, paste
from anonymizer.checks import validate_settings
from anonymizer.coverage import CoverFrame, SwapRegion, cover_frame
from anonymizer.crop import crop_box, crop_frame, crop_matrix
from anonymizer.persons import Person, link_persons, select_persons
from anonymizer.render import to_tensor, to_uint8
from anonymizer.scan import Stopwatch, _merge_faces
from anonymizer.settings import InferSettings, parse_face
from anonymizer.tracking import FaceTracker
from keepr.errors import KeeprError
from keepr.fileio import atomic_path, is_stale, output_lock, resolve_output, sha256_file

__all__ = ["IMAGE_EXTENSIONS", "load_models", "face_seed", "find_persons", "anonymize_image", "anonymize_batch",
           "read_photo", "write_photo", "list_images", "anonymize_images", "RECORDS_DIR"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
RECORDS_DIR = ".keepr"  # per-photo records and run.json, inside --out
REPORT_VERSION = 1
_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".bmp": "BMP"}
_SAVE_OPTIONS = {"JPEG": {"quality": 95}, "WEBP": {"quality": 95, "method": 4}, "PNG": {}, "BMP": {}}
# Settings that change no output pixel: a rerun may change them.
_NEUTRAL = {"progress", "strict"}


def load_models(paths, device: str = "cpu"):
    """The pipeline's models (``anonymizer.pipeline.load_models``) after checking that every file exists
    (MissingWeightsError naming the first missing one and where to get it)."""
    from anonymizer.pipeline import check_model_files  # heavy (torch): only in load_models()
    from anonymizer.pipeline import load_models as _load  # heavy (torch): only in load_models()

    check_model_files(paths)
    return _load(paths, device)


def face_seed(seed: int, name: str, index: int) -> int:
    """Candidate seed of face ``index`` of the photo ``name`` (its path relative to the input root, '/'-separated):
    the first 4 bytes of sha256 over the three, stable across runs, processes and machines."""
    h = hashlib.sha256(f"keepr-photo\0{int(seed)}\0{name}\0{int(index)}".encode("utf-8", "surrogatepass"))
    return int.from_bytes(h.digest()[:4], "big")


# ------------------------------------------------------------------------------------------------------------------
# One photo's faces.


@dataclass
class PhotoFaces:
    """What the detectors found in one photo."""

    persons: list[Person]  # one per tracking detection, largest first, ids 0, 1, ...
    faces: list[tuple]  # (x0, y0, x1, y1, score) of every face the coverage detector (or the tracker) found
    timings: dict = field(default_factory=dict)


def find_persons(image: np.ndarray, settings: InferSettings, recognizer=None) -> PhotoFaces:
    """Faces of one photo as a one-frame scan (see the module docstring)."""
    from anonymizer.faces import detect_faces  # heavy (torch): only in find_persons()

    s, d, t = settings, settings.detect, settings.track
    t0 = time.perf_counter()
    found = detect_faces(image, d.detector, d.upsample, d.min_size, d.max_side)
    t1 = time.perf_counter()
    cov_detector, cov_upsample = s.coverage_detector()
    if cov_detector == d.detector and cov_upsample == d.upsample:
        cov = found
    else:
        cov = detect_faces(image, cov_detector, cov_upsample, 0, d.max_side)
    t2 = time.perf_counter()
    tracker = FaceTracker(iou_threshold=t.iou_threshold, max_age=t.max_age, link_distance=t.link_distance,
                          min_detections=t.min_detections)
    tracker.update(0, found, image=image)
    persons = link_persons(tracker.finish(), recognizer, t.link_identity)
    t3 = time.perf_counter()
    return PhotoFaces(persons=persons, faces=_merge_faces(cov, found),
                      timings={"detect": (t1 - t0) * 1e3, "coverage_detect": (t2 - t1) * 1e3,
                               "describe": (t3 - t2) * 1e3})


# ------------------------------------------------------------------------------------------------------------------
# Virtual faces, batched.


def _chunks(items: list, size: int):
    for i in range(0, len(items), max(1, size)):
        yield items[i:i + max(1, size)]


def _encode(encoder, aligned: list[np.ndarray], device, batch: int):
    """ws [N, num_ws, w_dim] (CPU float32) of aligned uint8 RGB crops, ``batch`` at a time."""
    import torch  # heavy (torch): only in _encode()

    from keepr.images import to_float_image  # heavy (torch): only in _encode()

    out = []
    with torch.no_grad():
        for part in _chunks(aligned, batch):
            x = to_float_image(torch.from_numpy(np.stack(part)).permute(0, 3, 1, 2)).to(device)
            ws = encoder(x)
            if ws.ndim != 3 or ws.shape[0] != len(part):
                raise KeeprError(f"encoder returned shape {tuple(ws.shape)}, expected [{len(part)}, num_ws, w_dim]")
            out.append(ws.detach().float().cpu())
    return torch.cat(out)


def make_virtual_faces(models, jobs: list[tuple[np.ndarray, np.ndarray, int]], settings: InferSettings,
                       watch: Stopwatch | None = None) -> list:
    """One :class:`anonymizer.virtual_face.VirtualFace` per job (best image, its 68 landmarks, seed), or the
    one-line reason none could be made (a string), as :func:`anonymizer.pipeline.virtual_faces` gives.

    The same steps and numbers as :func:`anonymizer.virtual_face.build_virtual_face` with
    :func:`anonymizer.candidates.make_candidates` (noise per (seed, candidate, draw), guard, redraws, choice, skin
    match), but the encoder and the first draw of the generator run batched over all jobs.
    """
    import torch  # heavy (torch): only in make_virtual_faces()

    from anonymizer.candidates import (  # heavy (torch): only in make_virtual_faces()
        Candidate,
        _device_of,
        _noise,
        estimate_w_spread,
        guard_descriptor,
        identity_check,
        layer_mask,
        synthesize,
    )
    from anonymizer.faces import align_face  # heavy (torch): only in make_virtual_faces()
    from anonymizer.virtual_face import finish_virtual_face  # heavy (torch)

    watch = watch or Stopwatch()
    vs = settings.virtual_face
    bs = max(1, settings.swap.batch_size)
    G = models.G
    align_size = max(256, int(G.img_resolution))
    layers = vs.layers if isinstance(vs.layers, str) else tuple(vs.layers)
    guard = vs.guard_threshold is not None
    out: list = [None] * len(jobs)
    live = []  # (job index, aligned face, target descriptor)
    t0 = time.perf_counter()
    for j, (image, landmarks, _seed) in enumerate(jobs):
        try:
            aligned = align_face(image, landmarks, size=align_size)
            desc = None
            if guard:
                desc = guard_descriptor(models.recognizer, aligned.image)
                if desc is None:
                    raise KeeprError("identity guard: no face found in the aligned target crop; check the alignment "
                                     "or turn the guard off (guard_threshold=None)")
            live.append((j, aligned, desc))
        except KeeprError as exc:
            out[j] = " ".join(str(exc).split())
    watch.add("align", time.perf_counter() - t0, len(jobs))
    if not live:
        return out

    device = _device_of(G)
    t0 = time.perf_counter()
    ws_all = _encode(models.encoder, [a.image for _, a, _ in live], device, bs)
    watch.add("encode", time.perf_counter() - t0, len(live))
    if tuple(ws_all.shape[1:]) != (G.num_ws, G.w_dim):
        raise KeeprError(f"target latent has shape {tuple(ws_all.shape[1:])}, generator expects "
                         f"[{G.num_ws}, {G.w_dim}] (encoder trained for another generator?)")
    num = int(vs.num_candidates)
    mask = layer_mask(G.num_ws, G.img_resolution, layers).float()[:, None]
    spread = estimate_w_spread(G) if vs.noise > 0 else torch.zeros(G.w_dim)

    def latent(target_ws, seed: int, index: int, draw: int):
        eps = _noise(seed, index, draw, G.num_ws, G.w_dim, False)
        return target_ws + (vs.noise * spread[None, :] * eps * mask)[None]

    firsts = [torch.cat([latent(ws_all[i:i + 1], jobs[j][2], k, 0) for k in range(num)])
              for i, (j, _, _) in enumerate(live)]
    t0 = time.perf_counter()
    images = []
    for part in _chunks(firsts, bs):
        images.append(synthesize(G, torch.cat(part)))
    images = np.concatenate(images)
    watch.add("synthesize", time.perf_counter() - t0, len(firsts) * num)

    for i, (j, aligned, desc) in enumerate(live):
        t0 = time.perf_counter()
        seed = jobs[j][2]
        cands = []
        for k in range(num):
            ws, img, draw, history = firsts[i][k:k + 1], images[i * num + k], 0, []
            while True:
                if not guard:
                    dist, status = None, "unchecked"
                    break
                dist, status = identity_check(models.recognizer, img, desc, vs.guard_threshold)
                if status != "too close":
                    break
                if draw >= vs.max_redraws:
                    status = "rejected"
                    break
                history.append(dist)
                draw += 1
                ws = latent(ws_all[i:i + 1], seed, k, draw)
                img = synthesize(G, ws)[0]
            cands.append(Candidate(index=k, image=img, ws=ws.clone(), distance=dist, status=status, draws=draw + 1,
                                   history=history))
        watch.add("guard", time.perf_counter() - t0, num)
        t0 = time.perf_counter()
        try:
            out[j] = finish_virtual_face(cands, aligned, align_size, vs, seed)
        except KeeprError as exc:  # every candidate a look-alike: this face gets the fallback
            out[j] = " ".join(str(exc).split())
            continue
        watch.add("skin", time.perf_counter() - t0)
    return out


# ------------------------------------------------------------------------------------------------------------------
# Part swap, batched across faces with different virtual faces.


def _stacked_cache(caches: list):
    """One SourceCache holding N sources (entry i pairs with driving frame i)."""
    import torch  # heavy (torch): only in _stacked_cache()

    from models.cosegmentation.part_swap import SourceCache  # heavy (torch): only in _stacked_cache()

    feats = [c.features for c in caches]
    dtype = feats[0].dtype
    return SourceCache(image=torch.cat([c.image for c in caches]),
                       features=torch.cat([f.to(dtype).contiguous() for f in feats]),
                       seg={k: torch.cat([c.seg[k] for c in caches]) for k in caches[0].seg},
                       parts=torch.cat([c.parts for c in caches]))


def swap_faces(targets: list, crops: list[np.ndarray], settings: InferSettings, models,
               watch: Stopwatch | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Part swap of driving crop i with target i's virtual face, ``swap.batch_size`` faces per batch.

    Returns the swapped crops (uint8 [N,S,S,3]) and the blend masks (float32 [N,S,S], None with ``blend.mask
    crop``), as ``PartSwapper(..., return_mask=True)`` gives them for one face.
    """
    import torch  # heavy (torch): only in swap_faces()
    import torch.nn.functional as F  # heavy (torch): only in swap_faces()

    s = settings
    watch = watch or Stopwatch()
    model = models.coseg
    bs = max(1, s.swap.batch_size)
    ys, ms = [], []
    for start in range(0, len(targets), bs):
        t0 = time.perf_counter()
        part = targets[start:start + bs]
        swappers = [t.swapper for t in part]
        cache = swappers[0].cache if len(part) == 1 else _stacked_cache([sw.cache for sw in swappers])
        x = to_tensor(crops[start:start + bs], s.swap.device)
        sw = swappers[0]
        with torch.no_grad(), sw._precision():
            res = model.swap_batch(cache, x, sw.swap_index, hard=sw.hard, mask_from=sw.mask_from,
                                   align_corners=sw.align_corners)
        ys.append(to_uint8(res["prediction"].to(x.device)))
        if s.blend.mask == "parts":
            m = F.interpolate(res["blend_mask"], size=x.shape[2:], mode="bilinear", align_corners=False)
            ms.append(m.clamp(0, 1)[:, 0].float().cpu().numpy())
        watch.add("swap", time.perf_counter() - t0, len(part))
    return np.concatenate(ys), (np.concatenate(ms) if ms else None)


# ------------------------------------------------------------------------------------------------------------------
# Photos in memory.


def _choose(persons: list[Person], which, source: str) -> list[Person]:
    if not persons:
        return []
    return select_persons(persons, which, source=source)


def anonymize_batch(images: Sequence[np.ndarray], names: Sequence[str], settings: InferSettings, models,
                    watch: Stopwatch | None = None) -> list:
    """Anonymize several photos together (batched networks, see the module docstring).

    ``images``: uint8 RGB [H,W,3]; ``names``: their relative paths (they seed the candidates, :func:`face_seed`).
    Returns per photo ``(out_rgb, info)``, or the KeeprError that photo raised (e.g. ``--face 2`` on a photo with
    two faces): one photo's problem never stops the others.
    """
    from anonymizer.pipeline import check_parts, make_target  # heavy (torch): only in anonymize_batch()

    s = settings
    watch = watch or Stopwatch()
    check_parts(s.swap.parts, models.coseg)
    which = parse_face(s.face)
    img_size = int(models.coseg.img_size)
    n = len(images)
    results: list = [None] * n
    found: list[PhotoFaces | None] = [None] * n
    selected: list[list[Person]] = [[] for _ in range(n)]
    t_photo = [0.0] * n
    for k, (image, name) in enumerate(zip(images, names)):
        t0 = time.perf_counter()
        try:
            found[k] = find_persons(image, s, models.recognizer)
            selected[k] = _choose(found[k].persons, which, name or "image")
        except KeeprError as exc:
            results[k] = exc
        watch.add("detect", time.perf_counter() - t0)
        t_photo[k] += time.perf_counter() - t0

    # Virtual faces for every chosen person of every photo, batched.
    jobs, owners = [], []
    for k in range(n):
        if results[k] is not None:
            continue
        for p in selected[k]:
            tr = p.best
            ox, oy = tr.best_offset
            jobs.append((tr.best_image, tr.best_landmarks - np.array([ox, oy]), face_seed(s.seed, names[k], p.id)))
            owners.append((k, p))
    t0 = time.perf_counter()
    vfs = make_virtual_faces(models, jobs, s, watch)
    t_vf = time.perf_counter() - t0

    # Targets and driving crops, then one batched part swap over all faces.
    t0 = time.perf_counter()
    targets, crops, geometry = [], [], []
    failed: list[dict] = [{} for _ in range(n)]
    vf_of: list[dict] = [{} for _ in range(n)]
    for (k, p), vf in zip(owners, vfs):
        if isinstance(vf, str):
            failed[k][p.id] = vf
            continue
        vf_of[k][p.id] = vf
        tgt = make_target(p, vf, models, s, 1)
        cb = crop_box(tgt.timeline[0].box, s.crop.scale, s.crop.shift_y)
        crop, inv = crop_frame(images[k], cb, img_size)
        targets.append((k, tgt))
        crops.append(crop)
        geometry.append((inv, crop_matrix(cb, img_size)))
    watch.add("crop", time.perf_counter() - t0, len(crops))
    swapped, masks = (swap_faces([t for _, t in targets], crops, s, models, watch) if targets else (None, None))
    t_swap = time.perf_counter() - t0

    outs = {k: images[k].copy() for k in range(n) if results[k] is None}
    regions: list[list] = [[] for _ in range(n)]
    crop_only = feather_mask(None, img_size, border=s.blend.border)
    for j, (k, tgt) in enumerate(targets):
        t0 = time.perf_counter()
        inv, fwd = geometry[j]
        mask = feather_mask(masks[j], img_size, s.blend.dilate, s.blend.blur, s.blend.border) \
            if masks is not None else crop_only
        paste(outs[k], swapped[j], inv, mask, out=outs[k])
        regions[k].append(SwapRegion(tgt.person.id, fwd, mask))
        watch.add("paste", time.perf_counter() - t0)
        t_photo[k] += time.perf_counter() - t0

    faces_total = sum(len(selected[k]) for k in range(n) if results[k] is None)
    for k in range(n):
        if results[k] is not None:
            continue
        t0 = time.perf_counter()
        pf = found[k]
        chosen = {p.id for p in selected[k]}
        ctx = CoverFrame(chosen=chosen, every_person=which == "all",
                         descriptors={p.id: p.descriptor for p in pf.persons if p.descriptor is not None},
                         fallback=s.fallback, min_alpha=s.coverage.min_alpha, margin=s.coverage.margin,
                         identity=s.coverage.identity, recognizer=models.recognizer,
                         threshold=s.virtual_face.guard_threshold or 0.6, failed=failed[k])
        boxes = {}
        for p in pf.persons:
            tb = p.timeline(1, s.track.max_gap, s.track.hold, s.track.smooth_radius)[0]
            if tb.box is not None:
                boxes[p.id] = tb.box
        coverage = cover_frame(ctx, images[k], outs[k], pf.faces, boxes, regions[k], check_identity=True)
        dc = time.perf_counter() - t0
        watch.add("coverage", dc, len(coverage))
        share = len(selected[k]) / faces_total if faces_total else 0.0
        persons = []
        for p in pf.persons:
            b = p.best.best_box
            e = {"person": p.id, "box": [round(float(v), 1) for v in b], "chosen": p.id in chosen}
            if p.id in vf_of[k]:
                e["virtual_face"] = vf_of[k][p.id].report
            elif p.id in failed[k]:
                e["without_virtual_face"] = failed[k][p.id]
            persons.append(e)
        left = sum(r["result"] == "left" for r in coverage)
        timings = {key: round(v, 2) for key, v in pf.timings.items()}
        timings.update(virtual_face=round(t_vf * share * 1e3, 2), swap_paste=round(t_swap * share * 1e3, 2),
                       coverage=round(dc * 1e3, 2))
        info = {
            "faces": len(pf.faces), "persons_found": len(pf.persons), "chosen": sorted(chosen),
            "persons": persons, "coverage": coverage,
            "anonymized": sum(r["result"] in ("swap", "fallback") for r in coverage),
            "by_swap": sum(r["result"] == "swap" for r in coverage),
            "by_fallback": sum(r["result"] == "fallback" for r in coverage),
            "left": left, "kept": sum(r["result"] == "kept" for r in coverage),
            "identity_matches": sum(bool(r.get("identity_match")) for r in coverage),
            "complete": left == 0, "timing_ms": timings,
        }
        results[k] = (outs[k], info)
    return results


def anonymize_image(image_rgb: np.ndarray, settings: InferSettings, models, name: str = "") -> tuple[np.ndarray, dict]:
    """Anonymize one photo: uint8 RGB [H,W,3] in, the same size out, and ``info`` (``faces``: faces found;
    ``persons``: per face its box, whether chosen, its virtual face's report (seed, chosen candidate, candidate
    distances); ``coverage``: per face what was done; ``complete``; ``timing_ms``). ``name`` seeds the candidates
    (:func:`face_seed`). Raises KeeprError for bad settings or an impossible ``--face`` choice."""
    from keepr.images import to_rgb_uint8  # heavy (torch): only in anonymize_image()

    validate_settings(settings)
    image = to_rgb_uint8(image_rgb)
    res = anonymize_batch([image], [name], settings, models)[0]
    if isinstance(res, Exception):
        raise res
    return res


# ------------------------------------------------------------------------------------------------------------------
# Files.


@dataclass
class Photo:
    """A photo read for anonymization: RGB pixels with EXIF orientation applied, and how to write it back."""

    rgb: np.ndarray  # uint8 [H,W,3]
    alpha: np.ndarray | None  # uint8 [H,W] or None
    mode: str  # PIL mode of the output: RGB, RGBA, L or LA
    format: str  # PIL format name of the output (from the extension)
    icc_profile: bytes | None
    orientation: int  # the EXIF orientation tag that was applied (1: none)


def _format_of(path: Path) -> str:
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise KeeprError(f"{path}: not a photo file ({', '.join(IMAGE_EXTENSIONS)})")
    return fmt


def read_photo(path: str | os.PathLike) -> Photo:
    """Read a photo with PIL, EXIF orientation applied (``ImageOps.exif_transpose``); KeeprError on one line when it
    cannot be read."""

    path = Path(path)
    fmt = _format_of(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                orientation = int(im.getexif().get(0x0112, 1) or 1)
                icc = im.info.get("icc_profile")
                im = ImageOps.exif_transpose(im)
                mode = im.mode
                if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                    a = np.asarray(im, dtype=np.float64)
                    a = a / 257.0 if mode.startswith("I") else a  # 16-bit PNG gray (PIL: I;16 or I)
                    im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
                    mode = "L"
                has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info)
                alpha = np.asarray(im.convert("RGBA"))[:, :, 3].copy() if has_alpha else None
                rgb = np.ascontiguousarray(np.asarray(im.convert("RGB"), dtype=np.uint8))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning,
            MemoryError) as exc:
        msg = " ".join(str(exc).split()) or type(exc).__name__
        raise KeeprError(f"{path}: cannot read the image ({type(exc).__name__}: {msg})") from None
    gray = mode in ("L", "LA", "1")
    out_mode = ("LA" if gray else "RGBA") if alpha is not None else ("L" if gray else "RGB")
    if fmt == "JPEG":
        out_mode = "L" if gray else "RGB"
        alpha = None
    return Photo(rgb=rgb, alpha=alpha, mode=out_mode, format=fmt, icc_profile=icc, orientation=orientation)


def write_photo(photo: Photo, rgb: np.ndarray, dest: str | os.PathLike) -> None:
    """Write ``rgb`` as ``photo`` was (format, mode, alpha, ICC profile; no EXIF) to ``dest``, atomically."""

    im = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), "RGB")
    if photo.mode in ("L", "LA"):
        im = im.convert("L")
    if photo.alpha is not None and photo.mode in ("RGBA", "LA"):
        im.putalpha(Image.fromarray(photo.alpha, "L"))
    options = dict(_SAVE_OPTIONS[photo.format])
    if photo.icc_profile and photo.format in ("JPEG", "PNG", "WEBP"):
        options["icc_profile"] = photo.icc_profile
    with atomic_path(dest, suffix=Path(dest).suffix, clean_stale=False) as tmp:
        im.save(tmp, format=photo.format, **options)


def list_images(path: str | os.PathLike, exclude: str | os.PathLike | None = None) -> tuple[Path, list[str]]:
    """(root, relative paths) of the photos at ``path``: the file itself, or every jpg/jpeg/png/webp/bmp under the
    folder (recursively, '/'-separated, sorted; hidden entries and ``exclude`` skipped)."""
    p = Path(path)
    if p.is_file():
        _format_of(p)
        return p.parent, [p.name]
    if not p.is_dir():
        raise KeeprError(f"{path}: no such file or folder")
    ex = Path(os.path.realpath(exclude)) if exclude is not None else None
    rels = []
    for dirpath, dirnames, filenames in os.walk(p, followlinks=False):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and (ex is None or Path(os.path.realpath(here / d)) != ex))
        for f in filenames:
            if f.startswith(".") or Path(f).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            rels.append((here / f).relative_to(p).as_posix())
    if not rels:
        raise KeeprError(f"{path}: no photos ({', '.join(e[1:] for e in IMAGE_EXTENSIONS)}) in this folder or below")
    return p, sorted(rels)


def _fingerprint(settings: InferSettings, model_files: dict) -> dict:
    d = dataclasses.asdict(settings)
    for k in _NEUTRAL:
        d.pop(k, None)
    d.pop("models", None)
    return {"settings": d, "models": {k: v["sha256"] for k, v in model_files.items()}}


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


_TEMP = re.compile(r"^\.(?P<name>.+)\.keepr-[0-9a-f]{8}-\d{1,10}-\d{1,20}-[0-9a-f]{8}.*\.tmp$")


def _remove_stale(out: Path) -> list[Path]:
    """Temporaries left under ``out`` by killed runs (see keepr.fileio)."""

    removed = []
    for dirpath, dirnames, filenames in os.walk(out):
        for name in filenames + dirnames:
            m = _TEMP.match(name)
            if m and is_stale(name, Path(dirpath) / m["name"]):
                p = Path(dirpath) / name
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def _sha256(path: Path) -> str:
    return sha256_file(path)


def _record_path(out: Path, rel: str) -> Path:
    return out / RECORDS_DIR / (rel + ".json")


def _load_record(out: Path, rel: str, input_sha: str) -> dict | None:
    """The record of a photo done by an earlier run into ``out``, when its output is there and its input unchanged."""
    rec = _record_path(out, rel)
    try:
        data = json.loads(rec.read_text())
    except (OSError, ValueError):
        return None
    if data.get("input_sha256") != input_sha or not (out / rel).is_file():
        return None
    return data


def _write_json(dest: Path, data) -> None:
    with atomic_path(dest, clean_stale=False) as tmp:
        tmp.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")


def _prepare_out(out: Path, fingerprint: dict) -> None:
    """Refuse an ``--out`` that is not a directory, holds something else, or holds photos made with other settings;
    write run.json on first use."""
    if os.path.lexists(out) and not out.is_dir():
        raise KeeprError(f"{out}: output exists and is not a directory")
    run = out / RECORDS_DIR / "run.json"
    if out.is_dir() and not run.is_file():
        extra = [n for n in os.listdir(out) if not n.startswith(".")]
        if extra:
            raise KeeprError(f"{out}: output directory exists, is not empty and holds no KEEP:R photo run "
                             f"({RECORDS_DIR}/run.json); choose another --out or remove it")
    if run.is_file():
        try:
            before = json.loads(run.read_text())
        except (OSError, ValueError) as exc:
            raise KeeprError(f"{run}: cannot read it ({exc}); choose another --out or remove it") from None
        a, b = _flat(before), _flat(fingerprint)
        changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if changed:
            raise KeeprError(f"{out}: holds photos anonymized with other settings or models (changed: "
                             f"{', '.join(changed[:8])}{', ...' if len(changed) > 8 else ''}); rerun with the same "
                             "settings to resume, or choose another --out")
        return
    (out / RECORDS_DIR).mkdir(parents=True, exist_ok=True)
    _write_json(run, fingerprint)


def anonymize_images(path: str | os.PathLike, out_dir: str | os.PathLike, settings: InferSettings,
                     command: list[str] | None = None, models=None,
                     progress: Callable[[int, int], None] | None = None) -> dict:
    """Anonymize a photo or a folder of photos into ``out_dir`` (see the module docstring); returns the report,
    also written to ``out_dir/report.json``. Per-photo failures are listed in it (``failed``), never raised."""
    from anonymizer.pipeline import check_model_files, warn  # heavy (torch): only in anonymize_images()

    t_start = time.perf_counter()
    s = settings
    validate_settings(s)
    model_files = check_model_files(s.models)
    parse_face(s.face)
    out = resolve_output(out_dir)
    root, rels = list_images(path, exclude=out)
    fingerprint = _fingerprint(s, model_files)
    watch = Stopwatch()
    records: dict[str, dict] = {}
    skipped = processed = 0
    with output_lock(out_dir):
        _prepare_out(out, fingerprint)
        removed = _remove_stale(out)
        if removed:
            warn(f"removed {len(removed)} temporary output(s) of a killed run")
        bar = None
        if progress is None and s.progress:
            bar = tqdm(total=len(rels), desc="photos", unit="photo", file=sys.stderr, dynamic_ncols=True)
        group = max(1, s.swap.batch_size)
        for start in range(0, len(rels), group):
            names = rels[start:start + group]
            todo = {}
            for rel in names:
                src = root / rel
                try:
                    sha = _sha256(src)
                except OSError as exc:
                    records[rel] = _failed(rel, f"{src}: cannot read the file ({exc.strerror or exc})")
                    continue
                done = _load_record(out, rel, sha)
                if done is not None:
                    records[rel] = done
                    skipped += 1
                else:
                    todo[rel] = sha
            if todo:
                # The whole group goes through the networks, done photos too: the same batches as any other run.
                photos = {}
                for rel in names:
                    if rel not in todo and records[rel]["status"] == "failed":
                        continue
                    try:
                        t0 = time.perf_counter()
                        photos[rel] = read_photo(root / rel)
                        watch.add("read", time.perf_counter() - t0)
                    except KeeprError as exc:
                        if rel in todo:
                            records[rel] = _failed(rel, str(exc))
                            del todo[rel]
                batch = [rel for rel in names if rel in photos]
                if todo and models is None:
                    t0 = time.perf_counter()
                    models = load_models(s.models, s.swap.device)
                    watch.add("load_models", time.perf_counter() - t0, 0)
                res = anonymize_batch([photos[r].rgb for r in batch], batch, s, models, watch) if todo else []
                for rel, r in zip(batch, res):
                    if rel not in todo:
                        continue
                    processed += 1
                    try:
                        records[rel] = _finish(root, out, rel, todo[rel], photos[rel], r, watch)
                    except KeeprError as exc:
                        records[rel] = _failed(rel, str(exc))
            if bar is not None:
                bar.update(len(names))
            if progress is not None:
                progress(min(start + group, len(rels)), len(rels))
        if bar is not None:
            bar.close()
        report = _report(path, out_dir, s, command, model_files, rels, records, skipped, processed, watch,
                         time.perf_counter() - t_start)
        _write_json(out / "report.json", report)
    return report


def _failed(rel: str, error: str) -> dict:
    return {"path": rel, "status": "failed", "error": " ".join(str(error).split())}


def _finish(root: Path, out: Path, rel: str, input_sha: str, photo: Photo, result, watch: Stopwatch) -> dict:
    """Write one photo's output and record; its report entry."""
    src, dest = root / rel, out / rel
    if isinstance(result, Exception):
        return _failed(rel, str(result))
    rgb, info = result
    t0 = time.perf_counter()
    if info["faces"] == 0:
        with atomic_path(dest, suffix=dest.suffix, clean_stale=False) as tmp:
            shutil.copyfile(src, tmp)
        status = "no_face"
    else:
        write_photo(photo, rgb, dest)
        status = "anonymized" if info["complete"] else "incomplete"
    dw = time.perf_counter() - t0
    watch.add("write", dw)
    info["timing_ms"]["write"] = round(dw * 1e3, 2)
    entry = {"path": rel, "status": status, "input_sha256": input_sha, "output": rel,
             "output_sha256": _sha256(dest), "width": int(photo.rgb.shape[1]), "height": int(photo.rgb.shape[0]),
             "format": photo.format, "mode": photo.mode, "exif_orientation_applied": photo.orientation, **info}
    _write_json(_record_path(out, rel), entry)
    return entry


def _report(path, out_dir, s: InferSettings, command, model_files, rels, records, skipped, processed,
            watch: Stopwatch, seconds: float) -> dict:
    import torch  # heavy (torch): only in _report()

    images = [records[r] for r in rels if r in records]
    count = {k: sum(e["status"] == k for e in images) for k in ("anonymized", "incomplete", "no_face", "failed")}
    left = sum(e.get("left", 0) for e in images)
    incomplete = []
    if left:
        incomplete.append(f"{left} chosen face(s) left as they were in {count['incomplete']} photo(s)")
    return {
        "keepr": {"photo_report_version": REPORT_VERSION, "python": platform.python_version(),
                  "torch": torch.__version__},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "input": str(path),
        "output": str(out_dir),
        "models": model_files,
        "settings": dataclasses.asdict(s),
        "complete": not incomplete and not count["failed"],
        "incomplete": incomplete,
        "totals": {
            "images": len(rels), **count,
            "faces": sum(e.get("faces", 0) for e in images),
            "faces_anonymized": sum(e.get("anonymized", 0) for e in images),
            "by_swap": sum(e.get("by_swap", 0) for e in images),
            "by_fallback": sum(e.get("by_fallback", 0) for e in images),
            "left": left, "kept": sum(e.get("kept", 0) for e in images),
            "identity_matches": sum(e.get("identity_matches", 0) for e in images),
            "this_run": {"processed": processed, "skipped_done": skipped, "seconds": round(seconds, 3),
                         "photos_per_second": round(processed / seconds, 3) if seconds > 0 else None,
                         "stages": watch.summary()},
        },
        "failed": [{"path": e["path"], "error": e["error"]} for e in images if e["status"] == "failed"],
        "no_face": [e["path"] for e in images if e["status"] == "no_face"],
        "images": images,
    }


def summary_line(report: dict, out_dir: str | os.PathLike) -> str:
    """The last line ``infer.py --images`` prints."""
    t = report["totals"]
    r = t["this_run"]
    s = (f"wrote {out_dir}: {t['images']} photo(s): {t['anonymized'] + t['incomplete']} anonymized, {t['no_face']} "
         f"without a face (copied), {t['failed']} failed; {t['faces_anonymized']} face(s) anonymized "
         f"({t['by_swap']} swap, {t['by_fallback']} fallback), {t['left']} left, {t['kept']} kept by choice; "
         f"this run: {r['processed']} processed, {r['skipped_done']} already done ({r['photos_per_second']} "
         f"photos/s); report: {Path(out_dir) / 'report.json'}")
    return s + ("" if report["complete"] else " [INCOMPLETE]")
