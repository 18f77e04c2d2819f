"""Pair generation with Lightning: ``Trainer.predict`` renders pair indices; a prediction writer stores shards.

* :class:`PairPlanDataModule` decides which shards are still missing, malformed or changed (sha256) in the output
  directory (rank 0 prepares the directory, the list is broadcast) and hands each rank whole shards: rank r gets the r-th, (r+W)-th, ... missing
  shard. Its loader yields ``{"index", "z"}`` with ``z`` drawn per index (:func:`datasets.pairs.pair_z`).
* :class:`PairRenderer` (the LightningModule) maps and synthesizes. To keep pair i independent of the batch size and
  of the device count, the generator always runs on micro-batches of exactly ``render_batch`` rows, pair i sitting in
  row ``i % render_batch`` of micro-batch ``i // render_batch`` (missing rows are zero-padded). Matrix kernels pick
  their blocking from the batch shape, so this fixed shape is what makes the bits reproducible.
* :class:`PairShardWriter` collects rows per shard, writes each shard atomically once it is full, and at the end
  (teardown, after a barrier) rank 0 checks every shard, hashes the new ones and marks the manifest complete.
* :class:`PairsProgressBar` counts pairs, so the bar shows pairs/s.
"""
from __future__ import annotations

import copy
import json
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter, TQDMProgressBar
from torch.utils.data import DataLoader, Dataset

from datasets.pairs import (
    FORMAT, FORMAT_VERSION, MANIFEST, check_shard, fingerprint, fingerprint_id, pair_z, shard_changed, shard_name,
    shard_ranges, shard_stat, write_shard,
)
from keepr.errors import KeeprError
from keepr.fileio import sha256_file, write_text_atomic
from keepr.images import to_uint8

_OUR_FILES = re.compile(r"^(shard_\d{5}\.safetensors|\.shard_\d{5}\.safetensors\..*\.tmp|\.manifest\.json\..*\.tmp)$")
_TEMP_FILES = re.compile(r"^\.(shard_\d{5}\.safetensors|manifest\.json)\..*\.tmp$")


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
        raise KeeprError(f"{out}: holds {have} pairs, --num_pairs is {want}: use --extend to add pairs {have}..{want - 1} "
                         f"(the existing ones are kept), --overwrite to replace the set, or another --out_dir")
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
        if k not in rendered and rec.get("sha256") and {"size": rec.get("size"), "mtime_ns": rec.get("mtime_ns")} == stat:
            digest = rec["sha256"]
        else:
            digest = sha256_file(path)
            if rec.get("sha256") and digest != rec["sha256"] and k in rendered:
                raise KeeprError(f"{path}: rendered again but its sha256 differs from the one recorded when the set was "
                                 f"made: this machine (torch {torch.__version__}) renders other bits; regenerate the "
                                 f"whole set with --overwrite or finish it where it was made")
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
                   noise_mode: str = "const") -> dict:
    """The manifest of a run (shard list and ``complete`` are filled in by :func:`finalize_out_dir`)."""
    G = generator
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "complete": False,
        "generator": {
            "path": str(Path(generator_path).resolve()),
            "sha256": generator_sha256,
            "config": getattr(G, "init_kwargs", None),
        },
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
                    "w_i = G.mapping(z_i, truncation_psi)[:, 0]; image_i = (G.synthesis(ws_i, noise_mode) * 127.5 + 128)"
                    ".clamp(0, 255) as uint8 RGB [3, R, R]; generator micro-batch render_batch, pair i in row "
                    "i % render_batch",
        "torch_version": torch.__version__,
        "shards": [{"file": shard_name(k), "start": a, "stop": b}
                   for k, (a, b) in enumerate(shard_ranges(num_pairs, shard_size))],
    }


# ----------------------------------------------------------------------------------------------------------------------
# Data: which pairs this rank renders.

class _PairIndices(Dataset):
    """Pair indices with their z (computed here, so DataLoader workers share the sampling)."""

    def __init__(self, indices: list[int], seed: int, z_dim: int):
        self.indices, self.seed, self.z_dim = indices, seed, z_dim

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> dict[str, torch.Tensor]:
        i = self.indices[j]
        return {"index": torch.tensor(i, dtype=torch.int64), "z": pair_z(self.seed, i, self.z_dim)}


class PairPlanDataModule(pl.LightningDataModule):
    """Prepares the output directory and serves this rank's share of the missing shards, in index order."""

    def __init__(
        self,
        out_dir: str,           # Output pair directory.
        manifest: dict,         # Manifest of this run (without shard hashes); see generate_pairs.py.
        batch_size: int = 16,   # Pairs per predict_step.
        num_workers: int = 0,   # DataLoader workers computing z.
        overwrite: bool = False,  # Replace a pair directory made with other settings.
        extend: bool = False,   # Allow growing an existing set (more pairs, same settings).
        verify: bool = False,   # Hash every existing shard, not only those whose size or mtime changed.
    ):
        super().__init__()
        self.out_dir, self.manifest = str(out_dir), manifest
        self.batch_size, self.num_workers, self.overwrite = batch_size, num_workers, overwrite
        self.extend, self.verify = extend, verify
        self.ranges = shard_ranges(manifest["num_pairs"], manifest["shard_size"])
        self.todo: list[int] = []       # missing shards, all ranks
        self.my_shards: list[int] = []  # this rank's share

    def setup(self, stage: str | None = None) -> None:
        trainer = self.trainer
        todo = None
        if trainer.is_global_zero:
            todo = prepare_out_dir(self.out_dir, self.manifest, self.overwrite, self.extend, self.verify,
                                   log=lambda msg: print(msg, file=sys.stderr))
        # One list for all ranks, computed before anyone writes.
        self.todo = trainer.strategy.broadcast(todo, src=0)
        self.my_shards = self.todo[trainer.global_rank::trainer.world_size]

    @property
    def my_num_pairs(self) -> int:
        return sum(self.ranges[k][1] - self.ranges[k][0] for k in self.my_shards)

    def predict_dataloader(self) -> DataLoader:
        indices = [i for k in self.my_shards for i in range(*self.ranges[k])]
        if not indices and self.todo:
            # Lightning wants at least one batch on every rank once any rank has work: render one pair of another
            # rank's shard, which PairShardWriter discards (it keeps only this rank's shards).
            indices = [self.ranges[self.todo[0]][0]]
        ds = _PairIndices(indices, self.manifest["seed"], self.manifest["z_dim"])
        return DataLoader(ds, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)


# ----------------------------------------------------------------------------------------------------------------------
# Rendering.

class PairRenderer(pl.LightningModule):
    """Renders pairs: ``w = G.mapping(z, psi)[:, 0]``, ``image = uint8(G.synthesis(ws, noise_mode))``."""

    def __init__(
        self,
        generator: torch.nn.Module,             # StyleGAN2 Generator (models.stylegan2), eval mode.
        truncation_psi: float = 1.0,            # Truncation psi (1 = none).
        truncation_cutoff: int | None = None,   # Must be None: the dataset stores one w per pair.
        noise_mode: str = "const",              # Synthesis noise: 'const' keeps pair i a function of (seed, i).
        render_batch: int = 1,                  # Generator micro-batch; part of the dataset's identity.
    ):
        super().__init__()
        if truncation_cutoff is not None:
            raise KeeprError("truncation_cutoff is not supported for pairs: the dataset stores a single w per pair")
        if noise_mode not in ("const", "none"):
            raise KeeprError(f"noise_mode must be 'const' or 'none' for reproducible pairs, got {noise_mode!r}")
        if render_batch < 1:
            raise KeeprError(f"render_batch must be >= 1, got {render_batch}")
        self.G = generator.eval().requires_grad_(False)
        self.truncation_psi = float(truncation_psi)
        self.truncation_cutoff = truncation_cutoff
        self.noise_mode = noise_mode
        self.render_batch = int(render_batch)

    def render(self, index: torch.Tensor, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """Render pairs ``index`` (int64 [N]) from their ``z`` (float32 [N, z_dim]); outputs on the CPU."""
        assert z.ndim == 2 and z.shape[0] == index.shape[0] and z.shape[1] == self.G.z_dim, z.shape
        C = self.render_batch
        n = index.shape[0]
        res = self.G.img_resolution
        img = torch.empty(n, 3, res, res, dtype=torch.uint8)
        w = torch.empty(n, self.G.w_dim, dtype=torch.float32)
        chunk = (index // C).tolist()
        pos = (index % C).tolist()
        start = 0
        while start < n:  # consecutive rows of the same micro-batch
            stop = start + 1
            while stop < n and chunk[stop] == chunk[start]:
                stop += 1
            rows = torch.tensor(pos[start:stop], device=z.device)
            zbuf = torch.zeros(C, z.shape[1], dtype=z.dtype, device=z.device)
            zbuf[rows] = z[start:stop]
            ws = self.G.mapping(zbuf, None, truncation_psi=self.truncation_psi,
                                truncation_cutoff=self.truncation_cutoff)
            out = self.G.synthesis(ws, noise_mode=self.noise_mode)
            assert ws.shape == (C, self.G.num_ws, self.G.w_dim) and out.shape == (C, 3, res, res), (ws.shape, out.shape)
            w[start:stop] = ws[rows, 0].float().cpu()
            img[start:stop] = to_uint8(out[rows]).cpu()
            start = stop
        return {"image": img, "z": z.detach().float().cpu(), "w": w, "index": index.detach().cpu()}

    def on_predict_start(self) -> None:
        # Full fp32 on GPUs, as NVlabs' training loop does (TF32 convolutions would perturb the images).
        self._tf32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False

    def on_predict_end(self) -> None:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = self._tf32

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0):
        return self.render(batch["index"], batch["z"])


# ----------------------------------------------------------------------------------------------------------------------
# Callbacks.

class PairShardWriter(BasePredictionWriter):
    """Buffers rendered rows per shard and writes each shard atomically when it is full; rank 0 finalizes."""

    def __init__(self, out_dir: str, manifest: dict):
        super().__init__(write_interval="batch")
        self.out_dir, self.manifest = Path(out_dir), manifest
        self.ranges = shard_ranges(manifest["num_pairs"], manifest["shard_size"])
        self.fp_id = fingerprint_id(manifest)
        self.shard_size = manifest["shard_size"]
        self._buf: dict[int, list[dict[str, torch.Tensor]]] = {}
        self.written: list[int] = []
        self.final_manifest: dict | None = None

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        shard_of = (prediction["index"] // self.shard_size).tolist()
        mine = set(trainer.datamodule.my_shards)
        for k in sorted(set(shard_of) & mine):
            rows = torch.tensor([j for j, s in enumerate(shard_of) if s == k])
            self._buf.setdefault(k, []).append({key: v[rows] for key, v in prediction.items()})
            start, stop = self.ranges[k]
            if sum(len(p["index"]) for p in self._buf[k]) == stop - start:
                parts = self._buf.pop(k)
                tensors = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
                order = torch.argsort(tensors["index"])
                tensors = {key: v[order] for key, v in tensors.items()}
                write_shard(self.out_dir / shard_name(k), tensors, start, stop, self.fp_id)
                self.written.append(k)

    def on_predict_end(self, trainer, pl_module) -> None:
        if self._buf:
            raise RuntimeError(f"pair shards {sorted(self._buf)} received only part of their pairs")

    def teardown(self, trainer, pl_module, stage: str) -> None:
        # Not on_predict_end: Lightning skips the predict loop (and its end hooks) on a rank with nothing to do, but
        # calls teardown on every rank after a successful run (never after an exception).
        if stage != "predict":
            return
        trainer.strategy.barrier("pairs_written")
        if trainer.is_global_zero:
            self.final_manifest = finalize_out_dir(self.out_dir, self.manifest, set(trainer.datamodule.todo))
        trainer.strategy.barrier("pairs_final")


class PairsProgressBar(TQDMProgressBar):
    """TQDM bar over pairs instead of batches, so the rate reads pairs/s."""

    def init_predict_tqdm(self):
        bar = super().init_predict_tqdm()
        bar.unit = "pairs"
        bar.set_description("Generating pairs", refresh=False)
        return bar

    def on_predict_start(self, trainer, pl_module) -> None:
        super().on_predict_start(trainer, pl_module)
        self._pairs_done = 0

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if not self.has_dataloader_changed(dataloader_idx):
            return
        dm = trainer.datamodule
        total = dm.my_num_pairs if isinstance(dm, PairPlanDataModule) else None
        bar = self.predict_progress_bar
        bar.reset()
        bar.total = total
        bar.initial = 0
        bar.set_description("Generating pairs")

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._pairs_done += len(batch["index"])
        bar = self.predict_progress_bar
        if not bar.disable:
            bar.n = self._pairs_done
            bar.refresh()


def render_pairs(
    generator: torch.nn.Module,
    manifest: dict,
    out_dir: str,
    trainer_kwargs: dict[str, Any] | None = None,
    batch_size: int = 16,
    num_workers: int = 0,
    overwrite: bool = False,
    extend: bool = False,
    verify: bool = False,
) -> dict | None:
    """Run ``Trainer.predict`` over the missing pairs of ``out_dir``; returns the final manifest on rank 0."""
    kwargs = dict(trainer_kwargs or {})
    kwargs.update(logger=False, enable_checkpointing=False, use_distributed_sampler=False, enable_model_summary=False)
    kwargs.setdefault("enable_progress_bar", True)
    writer = PairShardWriter(out_dir, manifest)
    callbacks: list[pl.Callback] = [writer]
    if kwargs["enable_progress_bar"]:
        callbacks.append(PairsProgressBar())
    trainer = pl.Trainer(callbacks=callbacks, **kwargs)
    module = PairRenderer(generator, truncation_psi=manifest["truncation"]["psi"],
                          truncation_cutoff=manifest["truncation"]["cutoff"], noise_mode=manifest["noise_mode"],
                          render_batch=manifest["render_batch"])
    data = PairPlanDataModule(out_dir, manifest, batch_size=batch_size, num_workers=num_workers, overwrite=overwrite,
                              extend=extend, verify=verify)
    with warnings.catch_warnings():
        # A resumed run with every shard already present has nothing to predict: that is intended.
        warnings.filterwarnings("ignore", message=".*Total length of `DataLoader` across ranks is zero.*")
        trainer.predict(module, datamodule=data, return_predictions=False)
    return writer.final_manifest
