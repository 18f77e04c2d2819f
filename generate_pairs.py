"""Generate the (image, latent) pair dataset the encoder trains on.

    python generate_pairs.py --config configs/pairs/tiny.yaml --generator G.safetensors --out_dir data/pairs/tiny
    python generate_pairs.py --config configs/pairs/ffhq1024.yaml --generator ffhq.pkl --out_dir data/pairs/ffhq1024 \\
        --trainer.accelerator gpu --trainer.devices 2 --trainer.strategy ddp

Pair i depends only on (generator, seed, i): the result is the same for any batch size, number of devices, and after
an interrupted run is resumed (run the same command again). See datasets/pairs.py for the layout and manifest.

An existing set is never changed behind the user's back: other settings, a different --num_pairs included, are refused
unless --overwrite (replace the set) or, to grow it with the same settings, --extend (the result equals a set made at
the larger size from scratch). Every run checks the existing shards against the sha256 in the manifest (size and mtime
as the fast path, every byte with --verify) and renders a missing, damaged or changed shard again.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Optional

from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser
from pytorch_lightning import Trainer

from keepr.errors import KeeprError, cli_main
from keepr.registry import missing

# Trainer options this script sets itself (it writes no logs or checkpoints and assigns shards to ranks).
_TRAINER_FIXED = {"logger", "callbacks", "enable_checkpointing", "use_distributed_sampler", "enable_model_summary",
                  "plugins", "profiler", "model_registry", "limit_predict_batches", "fast_dev_run"}

def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], default_env=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config (configs/pairs/*.yaml)")
    parser.add_argument("--generator", type=Optional[str], default=None,
                        help="StyleGAN2 generator: NVlabs .pkl, rosinality .pt or KEEP:R .safetensors")
    parser.add_argument("--out_dir", type=Optional[str], default=None, help="output pair directory")
    parser.add_argument("--num_pairs", type=int, default=4000, help="number of pairs")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (>= 0); pair i uses (seed, i)")
    parser.add_argument("--batch_size", type=int, default=16, help="pairs per predict_step")
    parser.add_argument("--truncation_psi", type=float, default=1.0, help="truncation psi (1 = none)")
    parser.add_argument("--noise_mode", type=str, default="const", help="synthesis noise: const or none")
    parser.add_argument("--shard_size", type=int, default=512, help="pairs per shard file")
    parser.add_argument("--render_batch", type=int, default=8,
                        help="generator micro-batch; changes the bits, so it is part of the dataset's identity")
    parser.add_argument("--num_workers", type=int, default=0, help="DataLoader workers (z sampling)")
    parser.add_argument("--overwrite", action=ActionYesNo(yes_prefix="", no_prefix="no_"), default=False,
                        help="replace an existing pair directory (made with other settings or another --num_pairs)")
    parser.add_argument("--extend", action=ActionYesNo(yes_prefix="", no_prefix="no_"), default=False,
                        help="grow an existing pair set to --num_pairs (same settings; existing pairs are kept)")
    parser.add_argument("--verify", action=ActionYesNo(yes_prefix="", no_prefix="no_"), default=False,
                        help="hash every existing shard against the manifest, not only those whose size or mtime "
                             "changed")
    parser.add_class_arguments(Trainer, "trainer", skip=_TRAINER_FIXED, instantiate=False, fail_untyped=False)
    return parser


@cli_main
def main(argv: list[str] | None = None) -> int:
    cfg = build_parser().parse_args(argv)
    if not cfg.generator:
        raise KeeprError("--generator is required (a StyleGAN2 .pkl, .pt or .safetensors file)")
    if not cfg.out_dir:
        raise KeeprError("--out_dir is required")
    for name in ("num_pairs", "batch_size", "shard_size", "render_batch"):
        if getattr(cfg, name) < 1:
            raise KeeprError(f"--{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.seed < 0:
        raise KeeprError(f"--seed must be >= 0, got {cfg.seed}")
    if cfg.noise_mode not in ("const", "none"):
        raise KeeprError(f"--noise_mode must be 'const' or 'none' (random noise would make pairs irreproducible), "
                         f"got {cfg.noise_mode!r}")
    if cfg.overwrite and cfg.extend:
        raise KeeprError("--overwrite and --extend exclude each other: --overwrite replaces the set, --extend grows it")
    if not os.path.isfile(cfg.generator):
        raise missing("generator", cfg.generator)

    # Everything that can fail on the user's input happens before the output directory is touched.
    from datasets.pairs import build_manifest, check_out_dir
    from keepr.fileio import sha256_file
    from models.stylegan2 import load_generator
    from training.pairs_module import render_pairs

    G = load_generator(cfg.generator, device="cpu")
    # The manifest records the generator's sha256 and its path relative to the pair set (a copy made together with
    # its generator still finds it; train_encoder.py --model.generator_path finds one that moved).
    manifest = build_manifest(G, cfg.generator, sha256_file(cfg.generator), seed=cfg.seed, num_pairs=cfg.num_pairs,
                              truncation_psi=cfg.truncation_psi, shard_size=cfg.shard_size,
                              render_batch=cfg.render_batch, noise_mode=cfg.noise_mode, out_dir=cfg.out_dir)
    check_out_dir(cfg.out_dir, manifest, cfg.overwrite, cfg.extend)

    trainer_kwargs = {k: v for k, v in dict(cfg.trainer).items() if k not in _TRAINER_FIXED}
    start = time.time()
    final = render_pairs(G, manifest, cfg.out_dir, trainer_kwargs, batch_size=cfg.batch_size,
                         num_workers=cfg.num_workers, overwrite=cfg.overwrite, extend=cfg.extend, verify=cfg.verify)
    if final is not None:
        print(f"{cfg.out_dir}: {final['num_pairs']} pairs complete ({final['resolution']}px, "
              f"{len(final['shards'])} shards); this run took {time.time() - start:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    main()
