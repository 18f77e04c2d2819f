"""The (image, latent) pair format: written by ``generate_pairs.py``, read by the encoder's training. One place for
the manifest schema (:func:`build_manifest`, :func:`load_manifest`), the shard layout (:func:`write_shard`,
:func:`check_shard`), the output-directory checks (:func:`check_out_dir`, :func:`prepare_out_dir`,
:func:`missing_shards`, :func:`finalize_out_dir`) and the reader (:class:`PairDataset`, :class:`PairDataModule`).
``training/pairs_module.py`` only renders.

Layout of a pair directory::

    manifest.json            what made it (generator, seed, truncation, ...) and the shard list
    shard_00000.safetensors  pairs [0, S): image uint8 [n,3,R,R], z f32 [n,z_dim], w f32 [n,w_dim], index int64 [n]
    shard_00001.safetensors  pairs [S, 2S)
    ...

Pair ``i`` depends only on ``(seed, i)`` (and the generator): ``z_i`` comes from its own random stream
(:func:`pair_z`), ``w_i = G.mapping(z_i, truncation_psi)[:, 0]`` and the image is ``G.synthesis`` with constant noise,
converted to uint8 like NVlabs' ``generate.py``. Shards are written under a temporary name and renamed, so a shard file
that exists is complete; the manifest says ``"complete": true`` only once every shard is there. The manifest records
each shard's sha256, size and mtime: a changed shard is found by its hash (:func:`shard_changed`; size + mtime are the
fast path, the full hash is read when they differ or when asked to verify).

The manifest's ``generator`` entry holds the generator's ``sha256`` (its identity), its ``path`` relative to the pair
directory when there is one (else absolute; old manifests hold an absolute path) and ``absolute_path``, so a set
copied together with its generator, or moved alone, still finds it. :func:`find_generator` takes a path the user gives
(for a generator that moved), else the recorded ones, and always checks the file against the recorded sha256.

Only safetensors and JSON are ever read: no pickle.
"""
from __future__ import annotations

import bisect
import copy
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from keepr.errors import KeeprError
from keepr.fileio import atomic_path, sha256_file, write_text_atomic
from keepr.registry import missing

FORMAT = "keepr-pairs"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_KEYS = ("image", "z", "w", "index")
_META_KEY = "keepr_pairs"
# Files of a pair directory that generate_pairs.py may delete: shards and the temporaries of shards and the manifest.
_OUR_FILES = re.compile(r"^(shard_\d{5}\.safetensors|\.shard_\d{5}\.safetensors\..*\.tmp|\.manifest\.json\..*\.tmp)$")
_TEMP_FILES = re.compile(r"^\.(shard_\d{5}\.safetensors|manifest\.json)\..*\.tmp$")

__all__ = [
    "FORMAT", "FORMAT_VERSION", "MANIFEST", "PairDataset", "PairDataModule", "pair_z", "pairs_z",
    "shard_name", "shard_ranges", "fingerprint", "fingerprint_id", "write_shard", "check_shard", "load_manifest",
    "shard_stat", "shard_changed", "EpochShuffleSampler", "build_manifest", "generator_record",
    "recorded_generator_paths", "find_generator", "check_out_dir", "prepare_out_dir", "missing_shards",
    "finalize_out_dir",
]


# ----------------------------------------------------------------------------------------------------------------------
# Per-index sampling and pixel conversion.

def pair_z(seed: int, index: int, z_dim: int) -> torch.Tensor:
    """Latent z of pair ``index``: float32 [z_dim] from a PCG64 stream keyed by ``SeedSequence([seed, index])``.

    Each pair has its own stream, so z_i never depends on the batch, the device count or the order of generation.
    """
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(index)])))
    return torch.from_numpy(rng.standard_normal(z_dim).astype(np.float32))


def pairs_z(seed: int, indices: Sequence[int], z_dim: int) -> torch.Tensor:
    """Stack :func:`pair_z` for several indices: float32 [N, z_dim]."""
    return torch.stack([pair_z(seed, int(i), z_dim) for i in indices]) if len(indices) else torch.zeros(0, z_dim)


# ----------------------------------------------------------------------------------------------------------------------
# Shards.

def shard_name(k: int) -> str:
    return f"shard_{k:05d}.safetensors"


def shard_ranges(num_pairs: int, shard_size: int) -> list[tuple[int, int]]:
    """Index ranges [start, stop) of the shards: shard k holds pairs [k*S, min((k+1)*S, num_pairs))."""
    if num_pairs < 1 or shard_size < 1:
        raise ValueError(f"num_pairs and shard_size must be >= 1, got {num_pairs}, {shard_size}")
    return [(s, min(s + shard_size, num_pairs)) for s in range(0, num_pairs, shard_size)]


def fingerprint(manifest: dict) -> dict:
    """The settings that decide the bits of every pair (and the shard layout); two runs may share a directory
    only when these agree. ``num_pairs`` is not part of it: pair i is the same whatever the total."""
    return {
        "format": manifest.get("format"),
        "version": manifest.get("version"),
        "generator_sha256": manifest.get("generator", {}).get("sha256"),
        "seed": manifest.get("seed"),
        "truncation_psi": manifest.get("truncation", {}).get("psi"),
        "truncation_cutoff": manifest.get("truncation", {}).get("cutoff"),
        "noise_mode": manifest.get("noise_mode"),
        "render_batch": manifest.get("render_batch"),
        "shard_size": manifest.get("shard_size"),
    }


def fingerprint_id(manifest: dict) -> str:
    """Short hash of :func:`fingerprint`, stored in every shard so a shard from another run is never taken."""
    blob = json.dumps(fingerprint(manifest), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def write_shard(path: str | os.PathLike, tensors: dict[str, torch.Tensor], start: int, stop: int, fp_id: str) -> None:
    """Write one shard atomically (temporary name next to it, then rename)."""
    n = stop - start
    for key in SHARD_KEYS:
        if key not in tensors or tensors[key].shape[0] != n:
            raise ValueError(f"shard {path}: '{key}' missing or not {n} rows")
    if not torch.equal(tensors["index"], torch.arange(start, stop, dtype=torch.int64)):
        raise ValueError(f"shard {path}: indices are not {start}..{stop - 1}")
    meta = {_META_KEY: json.dumps({"version": FORMAT_VERSION, "fingerprint": fp_id, "start": start, "stop": stop})}
    data = {k: tensors[k].detach().cpu().contiguous() for k in SHARD_KEYS}
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(data, str(tmp), metadata=meta)


def check_shard(path: str | os.PathLike, start: int, stop: int, fp_id: str, resolution: int, z_dim: int,
                w_dim: int) -> str | None:
    """Why the shard at ``path`` is not the expected complete shard for pairs [start, stop), or None if it is."""
    path = Path(path)
    if not path.is_file():
        return "missing"
    n = stop - start
    want = {"image": ([n, 3, resolution, resolution], "U8"), "z": ([n, z_dim], "F32"), "w": ([n, w_dim], "F32"),
            "index": ([n], "I64")}
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(_META_KEY, "null"))
            if not isinstance(meta, dict):
                return "not a KEEP:R pair shard"
            if meta.get("fingerprint") != fp_id:
                return "made by another generator/seed/setting"
            if (meta.get("start"), meta.get("stop")) != (start, stop):
                return f"holds pairs {meta.get('start')}..{meta.get('stop')}, expected {start}..{stop}"
            for key, (shape, dtype) in want.items():
                if key not in f.keys():
                    return f"no '{key}' tensor"
                sl = f.get_slice(key)
                if list(sl.get_shape()) != shape or sl.get_dtype() != dtype:
                    return f"'{key}' is {sl.get_dtype()} {sl.get_shape()}, expected {dtype} {shape}"
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for a corrupt file
        return f"unreadable ({type(exc).__name__}: {exc})"
    return None


def shard_stat(path: str | os.PathLike) -> dict[str, int]:
    """Size and modification time (ns) of a shard: recorded in the manifest next to its sha256 as the fast check."""
    st = os.stat(path)
    return {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


def shard_changed(path: str | os.PathLike, record: dict, verify: bool = False) -> bool:
    """Whether the shard at ``path`` differs from its manifest ``record`` (``sha256``, optional ``size``/``mtime_ns``).

    The file is hashed when ``verify`` is set, when the record has no size/mtime or when they differ from the file's;
    otherwise the matching size and mtime are taken as "unchanged" (a change that restores the mtime needs ``verify``).
    A record without a sha256 cannot be checked and counts as unchanged.
    """
    if not record.get("sha256"):
        return False
    if not verify and "size" in record and "mtime_ns" in record:
        if shard_stat(path) == {"size": record["size"], "mtime_ns": record["mtime_ns"]}:
            return False
    return sha256_file(path) != record["sha256"]


# ----------------------------------------------------------------------------------------------------------------------
# Manifest.

def load_manifest(root: str | os.PathLike, require_complete: bool = True) -> dict:
    """Read ``root/manifest.json``; KeeprError (one line, naming the file) when it is missing, invalid or incomplete."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise KeeprError(f"{path}: not found; {root} is not a pair dataset (make one with generate_pairs.py)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KeeprError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise KeeprError(f"{path}: not a KEEP:R pair manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise KeeprError(f"{path}: format version {manifest.get('version')} is not supported "
                         f"(expected {FORMAT_VERSION})")
    if require_complete and not manifest.get("complete"):
        raise KeeprError(f"{path}: the dataset is incomplete (generation was interrupted); "
                         f"run generate_pairs.py again with the same --out_dir to finish it")
    return manifest


# ----------------------------------------------------------------------------------------------------------------------
# The generator that made a pair set: recorded by path and sha256, found again by either.

def generator_record(generator_path: str | os.PathLike, generator_sha256: str,
                     out_dir: str | os.PathLike | None = None, config: dict | None = None) -> dict:
    """The manifest's ``generator`` entry.

    ``path`` is relative to the pair directory ``out_dir`` when one is given (and a relative path exists: not across
    Windows drives), so a pair set copied together with its generator still finds it; else absolute.
    ``absolute_path`` finds it when the pair set alone moved. ``sha256`` is what both are checked against.
    """
    gen = Path(generator_path).resolve()
    record: dict[str, Any] = {"path": str(gen)}
    if out_dir is not None:
        try:
            record = {"path": os.path.relpath(gen, Path(out_dir).resolve()), "absolute_path": str(gen)}
        except ValueError:  # another drive: only an absolute path exists
            pass
    return {**record, "sha256": generator_sha256, "config": config}


def recorded_generator_paths(manifest: dict, root: str | os.PathLike) -> list[Path]:
    """Where the manifest of the pair set at ``root`` says its generator is, in the order tried: ``path`` (a relative
    one is taken against the pair directory), then ``absolute_path``."""
    record = manifest.get("generator") or {}
    paths: list[Path] = []
    for key in ("path", "absolute_path"):
        value = record.get(key)
        if not value:
            continue
        path = Path(value)
        if not path.is_absolute():
            # Lexical ".." is safe here: the pair directory is resolved (no symbolic links left in it) and a recorded
            # relative path is ".." steps followed by the generator's resolved location.
            path = Path(os.path.normpath(Path(root).resolve() / path))
        if path not in paths:
            paths.append(path)
    return paths


def _other_generator(path: Path, actual: str, expected: str, root) -> KeeprError:
    return KeeprError(f"{path}: not the generator that made the pairs in {root}: its sha256 is {actual}, the pair "
                      f"manifest records {expected}")


def find_generator(root: str | os.PathLike, given: str | os.PathLike | None = None,
                   manifest: dict | None = None) -> Path:
    """The generator file of the pair set at ``root``, checked against the sha256 its manifest records.

    ``given`` (a path the user passes, e.g. ``train_encoder.py --model.generator_path``, for a generator that moved)
    is taken when set; otherwise the recorded locations (:func:`recorded_generator_paths`), the first that holds a
    file with the recorded sha256. A given file with another sha256 is refused in one line naming both hashes; so is a
    recorded location holding another file when no location holds the right one. A manifest without a sha256 (not
    written by this code) is not checked.
    """
    manifest = manifest if manifest is not None else load_manifest(root, require_complete=False)
    expected = (manifest.get("generator") or {}).get("sha256")
    candidates = [Path(given)] if given else recorded_generator_paths(manifest, root)
    if not candidates:
        raise KeeprError(f"{Path(root) / MANIFEST}: names no generator; give its path (--model.generator_path)")
    wrong = None
    for path in candidates:
        if not path.is_file():
            continue
        if not expected:
            return path
        actual = sha256_file(path)
        if actual == expected:
            return path
        wrong = wrong or _other_generator(path, actual, expected, root)
    if wrong is not None:
        raise wrong
    if given:
        raise missing("generator", given)
    raise missing("generator", candidates[0],
                  what=f"the generator that made the pairs in {root}, sha256 {expected}; if it moved, give its new "
                       f"path with --model.generator_path")


# ----------------------------------------------------------------------------------------------------------------------
# Output directory: checks (read-only) and preparation (rank 0 only).

def _describe_difference(old: dict, new: dict) -> str:
    a, b = fingerprint(old), fingerprint(new)
    diffs = [f"{k} {a[k]!r} (now {b[k]!r})" for k in b if a.get(k) != b[k]]
    return ", ".join(diffs)


def _read_old_manifest(out: Path) -> dict | None:
    """The manifest already in ``out`` (None if there is none or it cannot be read)."""
    try:
        old = json.loads((out / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return old if isinstance(old, dict) else None


def check_out_dir(out_dir: str | os.PathLike, manifest: dict, overwrite: bool, extend: bool = False) -> None:
    """Refuse (KeeprError) an output directory that this run must not write into; never changes anything.

    Accepted: a missing or empty directory; a pair directory with the same fingerprint and the same number of pairs
    (resume, repair); the same fingerprint and more pairs with ``extend``; any pair directory with ``overwrite``. A
    different ``--num_pairs`` is other settings like a different seed: a set is never shrunk (its shards deleted or
    rewritten) without ``overwrite``. A non-empty directory that is not a pair directory is always refused.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise KeeprError(f"{out}: exists and is not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    path = out / MANIFEST
    if not path.is_file():
        raise KeeprError(f"{out}: exists, is not empty and is not a pair dataset (no {MANIFEST}); "
                         f"choose a new or empty --out_dir")
    try:
        old = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        if overwrite:
            return
        raise KeeprError(f"{path}: unreadable manifest ({exc}); use --overwrite to replace the dataset") from None
    if not isinstance(old, dict) or old.get("format") != manifest["format"]:
        raise KeeprError(f"{path}: not a KEEP:R pair manifest; choose a new or empty --out_dir")
    if overwrite:
        return
    if fingerprint(old) != fingerprint(manifest):
        raise KeeprError(f"{out}: made with other settings: {_describe_difference(old, manifest)}; "
                         f"use --overwrite to replace it or choose another --out_dir")
    have, want = old.get("num_pairs"), manifest["num_pairs"]
    if have == want:
        return
    if not isinstance(have, int) or isinstance(have, bool) or have < 1:
        raise KeeprError(f"{path}: invalid num_pairs {have!r}; use --overwrite to replace the dataset")
    if want > have and extend:
        return
    if want > have:
        raise KeeprError(f"{out}: holds {have} pairs, --num_pairs is {want}: use --extend to add pairs "
                         f"{have}..{want - 1} (the existing ones are kept), --overwrite to replace the set, or another "
                         f"--out_dir")
    raise KeeprError(f"{out}: holds {have} pairs, --num_pairs is {want}: a pair set is never shrunk without "
                     f"--overwrite (which deletes pairs {want}..{have - 1}); choose another --out_dir to keep it"
                     + ("; --extend only adds pairs" if extend else ""))


def _known_records(out: Path, manifest: dict, overwrite: bool) -> dict[str, dict]:
    """Shard records (sha256, size, mtime) of the existing manifest that still apply to this run's plan, by file."""
    old = None if overwrite else _read_old_manifest(out)
    if not old or fingerprint(old) != fingerprint(manifest):
        return {}
    plan = {s["file"]: (s["start"], s["stop"]) for s in manifest["shards"]}
    known = {}
    for rec in old.get("shards") or []:
        if isinstance(rec, dict) and plan.get(rec.get("file")) == (rec.get("start"), rec.get("stop")) \
                and rec.get("sha256"):
            known[rec["file"]] = {k: rec[k] for k in ("sha256", "size", "mtime_ns") if k in rec}
    return known


def prepare_out_dir(out_dir: str | os.PathLike, manifest: dict, overwrite: bool, extend: bool = False,
                    verify: bool = False, log=None) -> list[int]:
    """Make ``out_dir`` ready for this run and return the shards to render.

    Wipes our files on ``overwrite``, drops temporary files and shards that are not part of this plan, finds the
    shards that are missing, malformed or changed since their hash was recorded (:func:`missing_shards`) and, when
    anything is to be rendered, writes the manifest marked incomplete (keeping the recorded hashes). A complete set
    with nothing to do is left untouched.
    """
    check_out_dir(out_dir, manifest, overwrite, extend)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    known = _known_records(out, manifest, overwrite)
    planned = {s["file"] for s in manifest["shards"]}
    for p in out.iterdir():
        if not _OUR_FILES.match(p.name):
            continue
        if overwrite or _TEMP_FILES.match(p.name) or p.name not in planned:
            p.unlink()
    todo = missing_shards(out, manifest, known, verify=verify, log=log)
    old = _read_old_manifest(out)
    if todo or not (old and old.get("complete")) or old.get("num_pairs") != manifest["num_pairs"]:
        incomplete = copy.deepcopy(manifest)
        incomplete["complete"] = False
        for rec in incomplete["shards"]:
            k = known.get(rec["file"])
            if k:
                # A shard to be rendered again keeps only its expected hash, never a size/mtime taken as valid.
                rec.update({"sha256": k["sha256"]} if _shard_index(rec["file"]) in todo else k)
        write_text_atomic(out / MANIFEST, json.dumps(incomplete, indent=2) + "\n")
    return todo


def _shard_index(name: str) -> int:
    return int(name[len("shard_"):len("shard_") + 5])


def missing_shards(out_dir: str | os.PathLike, manifest: dict, known: dict[str, dict] | None = None,
                   verify: bool = False, log=None) -> list[int]:
    """Indices of the planned shards that are not present and valid: missing, malformed, or (for a shard with a
    recorded sha256 in ``known``) changed since it was hashed (:func:`datasets.pairs.shard_changed`)."""
    fp = fingerprint_id(manifest)
    known = known or {}
    todo = []
    for k, (start, stop) in enumerate(shard_ranges(manifest["num_pairs"], manifest["shard_size"])):
        path = Path(out_dir) / shard_name(k)
        why = check_shard(path, start, stop, fp, manifest["resolution"], manifest["z_dim"], manifest["w_dim"])
        if why is None and path.name in known and shard_changed(path, known[path.name], verify=verify):
            why = "sha256 differs from the manifest (the shard changed since it was generated)"
        if why is not None:
            if log is not None and why != "missing":
                log(f"{path}: {why}; rendering it again")
            todo.append(k)
    return todo


def finalize_out_dir(out_dir: str | os.PathLike, manifest: dict, rendered: set[int] | None = None) -> dict:
    """Check every shard, record its sha256, size and mtime, and write the manifest marked complete (rank 0, after
    all shards exist).

    A shard not rendered by this run whose size and mtime match the record in the manifest on disk keeps its recorded
    hash (the fast path); every other shard is hashed. A shard rendered again must reproduce its recorded hash: if it
    does not, this machine renders other bits than the one that made the set, and the set is left incomplete. The
    manifest file is only rewritten when its content changes.
    """
    out = Path(out_dir)
    fp = fingerprint_id(manifest)
    rendered = set(rendered or ())
    on_disk = _read_old_manifest(out) or {}
    records = {r.get("file"): r for r in on_disk.get("shards") or [] if isinstance(r, dict)}
    if fingerprint(on_disk) != fingerprint(manifest):
        records = {}
    shards = []
    for k, (start, stop) in enumerate(shard_ranges(manifest["num_pairs"], manifest["shard_size"])):
        path = out / shard_name(k)
        why = check_shard(path, start, stop, fp, manifest["resolution"], manifest["z_dim"], manifest["w_dim"])
        if why is not None:
            raise KeeprError(f"{path}: {why} after generation")
        rec = records.get(path.name, {})
        if (rec.get("start"), rec.get("stop")) != (start, stop):
            rec = {}
        stat = shard_stat(path)
        fast = {"size": rec.get("size"), "mtime_ns": rec.get("mtime_ns")} == stat
        if k not in rendered and rec.get("sha256") and fast:
            digest = rec["sha256"]
        else:
            digest = sha256_file(path)
            if rec.get("sha256") and digest != rec["sha256"] and k in rendered:
                raise KeeprError(f"{path}: rendered again but its sha256 differs from the one recorded when the set "
                                 f"was made: this machine (torch {torch.__version__}) renders other bits; regenerate "
                                 f"the whole set with --overwrite or finish it where it was made")
            if rec.get("sha256") and digest != rec["sha256"]:
                raise KeeprError(f"{path}: changed while generate_pairs.py was running (sha256 differs from the "
                                 f"manifest); run it again to render the shard again")
        shards.append({"file": path.name, "start": start, "stop": stop, "sha256": digest, **stat})
    done = copy.deepcopy(manifest)
    done["shards"] = shards
    done["complete"] = True
    text = json.dumps(done, indent=2) + "\n"
    try:
        same = (out / MANIFEST).read_text() == text
    except (OSError, UnicodeDecodeError):
        same = False
    if not same:
        write_text_atomic(out / MANIFEST, text)
    return done


def build_manifest(generator: torch.nn.Module, generator_path: str, generator_sha256: str, seed: int, num_pairs: int,
                   truncation_psi: float = 1.0, shard_size: int = 500, render_batch: int = 1,
                   noise_mode: str = "const", out_dir: str | os.PathLike | None = None) -> dict:
    """The manifest of a run (shard list and ``complete`` are filled in by :func:`finalize_out_dir`).

    ``out_dir`` is the pair directory it is for: the generator's path is recorded relative to it
    (:func:`generator_record`); without it the path is absolute.
    """
    G = generator
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "complete": False,
        "generator": generator_record(generator_path, generator_sha256, out_dir, getattr(G, "init_kwargs", None)),
        "seed": int(seed),
        "num_pairs": int(num_pairs),
        "truncation": {"psi": float(truncation_psi), "cutoff": None},
        "noise_mode": noise_mode,
        "render_batch": int(render_batch),
        "resolution": int(G.img_resolution),
        "latent": "w",
        "z_dim": int(G.z_dim),
        "w_dim": int(G.w_dim),
        "num_ws": int(G.num_ws),
        "shard_size": int(shard_size),
        "sampling": "z_i = numpy PCG64(SeedSequence([seed, i])).standard_normal(z_dim) as float32; "
                    "w_i = G.mapping(z_i, truncation_psi)[:, 0]; image_i = (G.synthesis(ws_i, noise_mode) * 127.5 "
                    "+ 128).clamp(0, 255) as uint8 RGB [3, R, R]; generator micro-batch render_batch, pair i in row "
                    "i % render_batch",
        "torch_version": torch.__version__,
        "shards": [{"file": shard_name(k), "start": a, "stop": b}
                   for k, (a, b) in enumerate(shard_ranges(num_pairs, shard_size))],
    }


# ----------------------------------------------------------------------------------------------------------------------
# Reading.

class PairDataset(Dataset):
    """Random access to a complete pair directory: item i is ``{"image": uint8 [3,R,R], "z": float32 [z_dim],
    "w": float32 [w_dim], "index": int64 []}``.

    Each item is read straight from its shard's memory map (safetensors slices), so access is fast and memory stays
    small at any resolution; shard handles are opened lazily per process (DataLoader workers included).
    """

    def __init__(
        self,
        root: str | os.PathLike,    # Pair directory written by generate_pairs.py.
        verify: bool = False,       # Also check every shard's sha256 against the manifest (reads everything).
    ):
        self.root = Path(root)
        self.manifest = load_manifest(self.root)
        m = self.manifest
        self.num_pairs = int(m["num_pairs"])
        self.resolution = int(m["resolution"])
        self.z_dim, self.w_dim, self.num_ws = int(m["z_dim"]), int(m["w_dim"]), int(m["num_ws"])
        # Where the manifest says the generator is (not checked here: see find_generator) and its sha256.
        recorded = recorded_generator_paths(m, self.root)
        self.generator_path = str(recorded[0]) if recorded else None
        self.generator_sha256 = m["generator"]["sha256"]
        fp_id = fingerprint_id(m)
        shards = m.get("shards") or []
        expected = shard_ranges(self.num_pairs, int(m["shard_size"]))
        if [(s["start"], s["stop"]) for s in shards] != expected:
            raise KeeprError(f"{self.root / MANIFEST}: shard list does not cover pairs 0..{self.num_pairs - 1}")
        for s in shards:
            path = self.root / s["file"]
            why = check_shard(path, s["start"], s["stop"], fp_id, self.resolution, self.z_dim, self.w_dim)
            if why is not None:
                raise KeeprError(f"{path}: {why}")
            if verify and sha256_file(path) != s.get("sha256"):
                raise KeeprError(f"{path}: sha256 differs from the manifest (the shard changed or is corrupt since it "
                                 f"was generated); run generate_pairs.py again with the same settings to regenerate it")
        self._files = [self.root / s["file"] for s in shards]
        self._starts = [int(s["start"]) for s in shards]
        self._handles: dict[int, Any] = {}

    def __len__(self) -> int:
        return self.num_pairs

    def _handle(self, k: int):
        h = self._handles.get(k)
        if h is None:
            h = self._handles[k] = safe_open(str(self._files[k]), framework="pt")
        return h

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        i = int(i)
        if i < 0:
            i += self.num_pairs
        if not 0 <= i < self.num_pairs:
            raise IndexError(f"pair index {i} out of range for {self.num_pairs} pairs")
        k = bisect.bisect_right(self._starts, i) - 1
        j = i - self._starts[k]
        f = self._handle(k)
        return {key: f.get_slice(key)[j:j + 1][0] for key in SHARD_KEYS}

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handles"] = {}  # safe_open handles cannot be pickled; each worker opens its own
        return state


class EpochShuffleSampler(Sampler[int]):
    """Random order of ``range(n)`` that depends only on ``(seed, epoch)``.

    ``torch.utils.data.RandomSampler`` draws each epoch's order from the global RNG, whose state after a resume differs
    from an uninterrupted run (model init, sanity check, dropout and input noise consume it), so a resumed run would
    see other batches. Lightning calls :meth:`set_epoch` before every epoch, also after restoring a checkpoint.
    """

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed, self.epoch = int(n), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


class PairDataModule(pl.LightningDataModule):
    """Train/val loaders over a pair directory.

    Split rule (deterministic, by pair index): the last ``round(val_fraction * num_pairs)`` pairs (at least one when
    ``val_fraction > 0``) are validation, all earlier ones training. Pairs are i.i.d. in their index, so this is an
    unbiased split, and it never changes with batch size, workers or seed.

    The pair set is checked when the module is made, before training creates anything: every shard's layout, and with
    ``verify`` (the default) its sha256 against the manifest, once, in the first process of each machine. The
    training order of epoch ``e`` depends only on ``(shuffle_seed, e)`` (:class:`EpochShuffleSampler`; under DDP
    Lightning's ``DistributedSampler``, which is keyed the same way), so a resumed run sees the same batches as an
    uninterrupted one.
    """

    def __init__(
        self,
        root: str,                  # Pair directory written by generate_pairs.py.
        batch_size: int = 32,       # Pairs per batch (train and val).
        num_workers: int = 0,       # DataLoader worker processes.
        val_fraction: float = 0.05, # Fraction of pairs held out for validation (the last indices).
        pin_memory: bool = False,   # Pin host memory (GPU training).
        drop_last: bool = True,     # Drop the last incomplete training batch.
        verify: bool = True,        # Check every shard's sha256 against the manifest before training (reads the set).
        shuffle_seed: Optional[int] = None,  # Seed of the training order; default: seed_everything's (PL_GLOBAL_SEED).
    ):
        super().__init__()
        if not 0.0 <= val_fraction < 1.0:
            raise KeeprError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if batch_size < 1:
            raise KeeprError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise KeeprError(f"num_workers must be >= 0, got {num_workers}")
        if shuffle_seed is not None and shuffle_seed < 0:
            raise KeeprError(f"shuffle_seed must be >= 0, got {shuffle_seed}")
        self.root = root
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.pin_memory = pin_memory
        self.drop_last = drop_last
        self.verify = verify
        self.shuffle_seed = shuffle_seed
        self.manifest = load_manifest(root)
        n = int(self.manifest["num_pairs"])
        n_val = int(round(val_fraction * n))
        if val_fraction > 0:
            n_val = min(max(n_val, 1), n - 1)
        self.train_indices = list(range(0, n - n_val))
        self.val_indices = list(range(n - n_val, n))
        # Other processes of a DDP run on the same machine read the files the first one has just checked.
        first_local = os.environ.get("LOCAL_RANK", "0") == "0"
        self.dataset: PairDataset = PairDataset(root, verify=verify and first_local)
        self.train_set = Subset(self.dataset, self.train_indices)
        self.val_set = Subset(self.dataset, self.val_indices)

    @property
    def generator_path(self) -> Optional[str]:
        """Where the manifest says the generator is (a relative path taken against the pair directory)."""
        return self.dataset.generator_path

    @property
    def resolution(self) -> int:
        return int(self.manifest["resolution"])

    def setup(self, stage: str | None = None) -> None:
        """Nothing to do: the data set is opened (and checked) in ``__init__``."""

    def _seed(self) -> int:
        if self.shuffle_seed is not None:
            return int(self.shuffle_seed)
        return int(os.environ.get("PL_GLOBAL_SEED", "0") or 0)

    def _distributed(self) -> bool:
        trainer = getattr(self, "trainer", None)
        return trainer is not None and trainer.world_size > 1

    def _loader(self, subset: Subset, train: bool) -> DataLoader:
        shuffle, sampler = False, None
        if train and self._distributed():
            shuffle = True  # Lightning swaps in a DistributedSampler, keyed by (seed, epoch).
        elif train:
            sampler = EpochShuffleSampler(len(subset), self._seed())
        return DataLoader(subset, batch_size=self.batch_size, shuffle=shuffle, sampler=sampler,
                          num_workers=self.num_workers, pin_memory=self.pin_memory,
                          drop_last=train and self.drop_last and len(subset) >= self.batch_size,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)
