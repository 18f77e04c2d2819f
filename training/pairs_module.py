"""Pair generation with Lightning: ``Trainer.predict`` renders pair indices; a prediction writer stores shards.

The pair format itself (manifest schema, shard layout, output-directory checks) is :mod:`datasets.pairs`; this module
only renders and writes.

* :class:`PairPlanDataModule` asks :func:`datasets.pairs.prepare_out_dir` which shards are still missing, malformed or
  changed (sha256) in the output directory (rank 0 prepares the directory, the list is broadcast) and hands each rank
  whole shards: rank r gets the r-th, (r+W)-th, ... missing shard. Its loader yields ``{"index", "z"}`` with ``z``
  drawn per index (:func:`datasets.pairs.pair_z`).
* :class:`PairRenderer` (the LightningModule) maps and synthesizes. To keep pair i independent of the batch size and
  of the device count, the generator always runs on micro-batches of exactly ``render_batch`` rows, pair i sitting in
  row ``i % render_batch`` of micro-batch ``i // render_batch`` (missing rows are zero-padded). Matrix kernels pick
  their blocking from the batch shape, so this fixed shape is what makes the bits reproducible.
* :class:`PairShardWriter` collects rows per shard, writes each shard atomically once it is full, and at the end
  (teardown, after a barrier) rank 0 checks every shard, hashes the new ones and marks the manifest complete
  (:func:`datasets.pairs.finalize_out_dir`).
* :class:`PairsProgressBar` counts pairs, so the bar shows pairs/s.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter, TQDMProgressBar
from torch.utils.data import DataLoader, Dataset

from datasets.pairs import (
    finalize_out_dir,
    fingerprint_id,
    pair_z,
    prepare_out_dir,
    shard_name,
    shard_ranges,
    write_shard,
)
from keepr.errors import KeeprError
from keepr.images import to_uint8

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
