"""Every setting and the output path checked before any work starts.

:func:`validate_settings` checks all options of an :class:`anonymizer.pipeline.InferSettings` (types, ranges, names,
the torch device) in one pass and raises one :class:`~keepr.errors.KeeprError` whose single line names every bad
option and why (problems joined by ``"; "``). :func:`check_out_dir` checks the output directory and returns where
the output will really go; :func:`prepared_output` takes the output lock, removes stale temporaries of killed runs
and checks again under the lock.

Nothing here reads the video or the models (the model files are :func:`anonymizer.pipeline.check_model_files`'s, the
swap parts' upper bound is known only once the co-part model is loaded).
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from keepr.errors import KeeprError
from keepr.fileio import (
    check_empty_dir,
    lock_path,
    output_lock,
    remove_stale_temporaries,
    resolve_output,
)

DETECTORS = ("hog", "cnn")
FALLBACKS = ("blur", "mosaic", "blackbox", "none")  # anonymizer.settings.FALLBACKS
MASK_FROM = ("driving", "source")
BLEND_MASKS = ("parts", "crop")
# Style-layer groups of anonymizer.candidates.LAYER_GROUPS (named here so the check does not import torch; a test
# keeps the two in step).
LAYER_GROUPS = ("coarse", "middle", "fine")
# anonymizer.video.AUDIO_MODES
AUDIO_MODES = ("copy", "aac", "none")
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow",
                "placebo")
DEVICE_TYPES = ("cpu", "cuda", "mps")
CROP_SCALE = (0.5, 5.0)  # crop side / face box side: below, the crop cuts the face; above, the face is a few pixels
MAX_UPSAMPLE = 4  # each step doubles the image side for the detector: 4 is already 256x the pixels
MAX_SEED = 2 ** 32 - 1  # candidates seed numpy's SeedSequence with the low 32 bits


class _Problems(list):
    """Collects one message per bad option."""

    def integer(self, name: str, v, lo: int | None = None, hi: int | None = None, what: str = "") -> bool:
        if isinstance(v, bool) or not isinstance(v, int):
            self.append(f"{name} must be an integer{what}, got {v!r}")
            return False
        if lo is not None and v < lo or hi is not None and v > hi:
            rng = f">= {lo}" if hi is None else f"<= {hi}" if lo is None else f"between {lo} and {hi}"
            self.append(f"{name} must be {rng}{what}, got {v}")
            return False
        return True

    def number(self, name: str, v, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
               hi_open: bool = False, what: str = "") -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            self.append(f"{name} must be a number{what}, got {v!r}")
            return False
        if not math.isfinite(v):
            self.append(f"{name} must be a finite number{what}, got {v}")
            return False
        bad_lo = lo is not None and (v <= lo if lo_open else v < lo)
        bad_hi = hi is not None and (v >= hi if hi_open else v > hi)
        if bad_lo or bad_hi:
            if hi is None:
                rng = f"{'>' if lo_open else '>='} {lo:g}"
            elif lo is None:
                rng = f"{'<' if hi_open else '<='} {hi:g}"
            else:
                rng = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
            self.append(f"{name} must be {rng}{what}, got {v:g}")
            return False
        return True

    def choice(self, name: str, v, choices) -> bool:
        if v not in choices:
            self.append(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {v!r}")
            return False
        return True

    def boolean(self, name: str, v) -> bool:
        if not isinstance(v, bool):
            self.append(f"{name} must be true or false, got {v!r}")
            return False
        return True


def check_device(device, option: str = "swap.device") -> str:
    """The torch device string if it names a device that exists here; KeeprError naming ``option`` otherwise."""
    if device == "cpu":
        return device
    if not isinstance(device, str) or not device.strip():
        raise KeeprError(f"{option} must be a torch device name such as cpu, cuda or cuda:0, got {device!r}")
    import torch  # heavy (torch): only in check_device()

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise KeeprError(f"{option} {device!r}: not a torch device name (use cpu, cuda, cuda:N or mps)") from None
    if dev.type not in DEVICE_TYPES:
        raise KeeprError(f"{option} {device!r}: device type {dev.type!r} is not supported (use cpu, cuda, cuda:N "
                         "or mps)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise KeeprError(f"{option} {device!r}: no CUDA GPU is available (torch.cuda.is_available() is False); "
                             "use cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise KeeprError(f"{option} {device!r}: there {'is' if n == 1 else 'are'} only {n} CUDA GPU"
                             f"{'' if n == 1 else 's'} (cuda:0..cuda:{n - 1})")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise KeeprError(f"{option} {device!r}: no Apple MPS device is available; use cpu")
    elif dev.index not in (None, 0):
        raise KeeprError(f"{option} {device!r}: there is one cpu device (cpu)")
    return device


def validate_settings(s) -> None:
    """Check every option of ``s`` (an ``InferSettings``) before any work; KeeprError naming each bad one.

    The message is one line: ``"<option> <what is wrong>, got <value>"`` per problem, joined by ``"; "``.
    """
    p = _Problems()

    # face, seed, progress
    face = s.face
    if isinstance(face, str) and face.strip().isdigit():
        face = int(face)
    if isinstance(face, bool) or not (face in ("largest", "all") or isinstance(face, int) and face >= 0):
        p.append(f"face must be 'all', 'largest' or a person index >= 0, got {s.face!r}")
    p.integer("seed", s.seed, 0, MAX_SEED)
    p.boolean("progress", s.progress)

    p.choice("fallback", s.fallback, FALLBACKS)
    p.boolean("strict", s.strict)

    # detect
    d = s.detect
    p.choice("detect.detector", d.detector, DETECTORS)
    p.integer("detect.upsample", d.upsample, 0, MAX_UPSAMPLE)
    every_ok = p.integer("detect.every", d.every, 1)
    if d.max_side is not None:
        p.integer("detect.max_side", d.max_side, 64, what=" (or null for full size)")
    p.number("detect.min_size", d.min_size, 0)

    # coverage
    c = s.coverage
    if c.detector is not None:
        p.choice("coverage.detector", c.detector, DETECTORS)
    if c.upsample is not None and p.integer("coverage.upsample", c.upsample, 0, MAX_UPSAMPLE, what=" (or null)") \
            and isinstance(d.upsample, int) and c.upsample < d.upsample \
            and (c.detector is None or c.detector == d.detector):
        p.append(f"coverage.upsample ({c.upsample}) must be >= detect.upsample ({d.upsample}): the coverage pass must "
                 "be at least as sensitive as the tracking pass")
    p.boolean("coverage.extend_tracks", c.extend_tracks)
    p.number("coverage.min_alpha", c.min_alpha, 0, 1, lo_open=True)
    p.boolean("coverage.identity", c.identity)
    p.integer("coverage.identity_every", c.identity_every, 1)
    p.number("coverage.margin", c.margin, 0, 1)

    # track
    t = s.track
    p.number("track.iou_threshold", t.iou_threshold, 0, 1, lo_open=True)
    p.integer("track.max_age", t.max_age, 0)
    p.number("track.link_distance", t.link_distance, 0)
    if t.link_identity is not None:
        p.number("track.link_identity", t.link_identity, 0, 2, lo_open=True, what=" (or null: no identity linking)")
    p.integer("track.min_detections", t.min_detections, 1)
    if p.integer("track.max_gap", t.max_gap, 0) and every_ok and t.max_gap < d.every - 1:
        p.append(f"track.max_gap ({t.max_gap}) must be >= detect.every - 1 ({d.every - 1}) so that frames between "
                 "detections are interpolated")
    p.integer("track.hold", t.hold, 0)
    p.integer("track.smooth_radius", t.smooth_radius, 0)

    # crop
    p.number("crop.scale", s.crop.scale, *CROP_SCALE, what=" (crop side / face box side, default 1.8)")
    p.number("crop.shift_y", s.crop.shift_y, -1, 1, what=" (crop centre offset in face box heights)")

    # swap
    w = s.swap
    parts = w.parts
    if not isinstance(parts, (list, tuple)) or not parts:
        p.append(f"swap.parts (--swap_parts) must name the co-part segments to swap, e.g. 1,2,5, got {parts!r}")
    else:
        bad = [v for v in parts if isinstance(v, bool) or not isinstance(v, int) or v < 1]
        if bad:
            p.append(f"swap.parts (--swap_parts) must be segment numbers >= 1 (0 is the background), got "
                     f"{list(parts)!r}")
        elif len(set(parts)) != len(parts):
            p.append(f"swap.parts (--swap_parts) names a segment twice: {list(parts)!r}")
    p.boolean("swap.hard", w.hard)
    p.choice("swap.mask_from", w.mask_from, MASK_FROM)
    p.integer("swap.batch_size", w.batch_size, 1, what=" (frames per part-swap batch)")
    try:
        check_device(w.device, "swap.device")
        from keepr.precision import check_precision  # imports torch: only once the device is known to be valid

        try:
            check_precision(w.precision, w.device, warn=False)
        except KeeprError as exc:
            p.append(f"swap.precision {w.precision!r}: {exc}")
    except KeeprError as exc:
        p.append(str(exc))

    # blend
    b = s.blend
    p.choice("blend.mask", b.mask, BLEND_MASKS)
    p.number("blend.dilate", b.dilate, 0)
    p.number("blend.blur", b.blur, 0)
    p.number("blend.border", b.border, 0, 0.5, hi_open=True, what=" (fraction of the crop side)")

    # virtual_face
    v = s.virtual_face
    n_ok = p.integer("virtual_face.num_candidates", v.num_candidates, 1)
    if v.candidate is not None and p.integer("virtual_face.candidate (--candidate)", v.candidate, 0) and n_ok \
            and v.candidate >= v.num_candidates:
        p.append(f"virtual_face.candidate (--candidate) {v.candidate} out of range: there are {v.num_candidates} "
                 f"candidates (0..{v.num_candidates - 1})")
    p.number("virtual_face.noise", v.noise, 0)
    layers = v.layers
    if layers != "all":
        if isinstance(layers, str):
            layers = [layers]
        if not isinstance(layers, (list, tuple)) or not layers or any(g not in LAYER_GROUPS for g in layers):
            p.append(f"virtual_face.layers must be 'all' or a non-empty subset of {list(LAYER_GROUPS)}, got "
                     f"{v.layers!r}")
    if v.guard_threshold is not None:
        p.number("virtual_face.guard_threshold", v.guard_threshold, 0, lo_open=True, what=" (or null for no guard)")
    p.integer("virtual_face.max_redraws", v.max_redraws, 0)
    p.boolean("virtual_face.skin_match", v.skin_match)

    # encode
    e = s.encode
    p.integer("encode.crf", e.crf, 0, 51)
    p.choice("encode.preset", e.preset, X264_PRESETS)
    p.choice("encode.audio", e.audio, AUDIO_MODES)
    p.integer("encode.threads", e.threads, 0, 64, what=" (x264 threads; 0 lets x264 decide)")

    # models: paths must be given (their existence is check_model_files')
    for key in ("generator", "encoder", "cosegmentation", "cosegmentation_config"):
        path = getattr(s.models, key)
        if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
            p.append(f"models.{key} must be a file path, got {path!r}")

    if p:
        raise KeeprError("; ".join(p))


# ------------------------------------------------------------------------------------------------------------------
# Output directory.


def check_out_dir(out_dir: str | os.PathLike) -> Path:
    """Check that the output directory can be written; return the resolved target (absolute, symlinks followed).

    Refused (KeeprError naming ``out_dir`` and the cause): an existing file or other non-directory (also through a
    symlink), a directory that is not empty (entries other than KEEP:R's own temporaries and lock), a directory that
    cannot be written, a missing directory whose nearest existing parent is not a writable directory. Accepted: a
    missing directory, an empty one, a symlink to either (the output goes where it points; the symlink stays), an
    empty mount point (the files are written into it, see ``keepr.fileio.atomic_dir``). Nothing is created.
    """
    shown = out_dir
    target = resolve_output(out_dir)
    if os.path.lexists(target) and not target.is_dir():
        what = "is not a directory" if target.exists() else "is a broken symlink"
        via = f" ({target})" if os.fspath(target) != os.path.abspath(os.fspath(out_dir)) else ""
        raise KeeprError(f"{shown}: output exists and {what}{via}")
    if target.is_dir():
        check_empty_dir(shown, target)
        into = os.path.ismount(target) or not os.access(target.parent, os.W_OK | os.X_OK)
        where = target if into else target.parent
        if not os.access(where, os.W_OK | os.X_OK):
            raise KeeprError(f"{shown}: cannot write the output ({where} is not writable)")
        return target
    probe = target.parent
    while not os.path.lexists(probe):
        probe = probe.parent
    if not probe.is_dir():
        raise KeeprError(f"{shown}: cannot create the output directory ({probe} is not a directory)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise KeeprError(f"{shown}: cannot create the output directory ({probe} is not writable)")
    return target


@dataclass
class PreparedOutput:
    target: Path  # where the output goes (resolved): pass it to keepr.fileio.atomic_dir
    removed: list[Path]  # stale temporaries of killed runs removed from there
    lock: Path  # the lock file held for the block


@contextlib.contextmanager
def prepared_output(out_dir: str | os.PathLike) -> Iterator[PreparedOutput]:
    """Check ``out_dir``, lock it for the block and remove stale temporaries of killed runs.

    KeeprError before the block runs when :func:`check_out_dir` refuses, or when another run holds the lock
    ("another KEEP:R run is writing to it (pid N)"). The check is repeated under the lock (another run may have
    finished into it meanwhile). The lock file is removed on exit.
    """
    target = check_out_dir(out_dir)
    lock = lock_path(target)
    with output_lock(out_dir):
        removed = remove_stale_temporaries(target)
        check_out_dir(out_dir)
        yield PreparedOutput(target=target, removed=removed, lock=lock)
