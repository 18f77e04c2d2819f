"""Train the image -> latent encoder on a pair directory (LightningCLI).

    python train_encoder.py fit --config configs/encoder/tiny.yaml
    python train_encoder.py fit --config configs/encoder/tiny.yaml \
        --ckpt_path outputs/encoder_tiny/checkpoints/last.ckpt
    python train_encoder.py fit --config configs/encoder/ffhq256.yaml --data.root PAIRS --model.generator_path ffhq.pkl

The generator is the one the pair manifest names (its path relative to the pair set, then its absolute path); give
one that moved with ``--model.generator_path``: it must have the sha256 the manifest records.

Logging goes to Weights & Biases, offline unless WANDB_MODE is set. Checkpoints (``--checkpoint.*``, a
ModelCheckpoint on val/latent_mse) and the exported encoder (``--export.path``, default
``<checkpoint dir>/../encoder.safetensors``) are written when fit ends.

Every input is checked before anything is written (no W&B run, checkpoint or log directory): the options, the pair set
(layout and every shard's sha256), the generator file and ``--ckpt_path`` (read with ``weights_only=True``, so a
checkpoint that would run code is refused, and it must fit the model). A failure is one line on stderr, exit status 1.
"""
from __future__ import annotations

import os

from jsonargparse import ArgumentError, Namespace
from lightning_fabric.utilities.exceptions import MisconfigurationException
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningCLI

from datasets.pairs import PairDataModule
from keepr.errors import KeeprError, cli_main
from training.encoder_module import (
    EncoderModule,
    ExportEncoder,
    check_checkpoint_fits,
    check_hparams,
    read_training_checkpoint,
)

# ckpt_path values Lightning resolves itself (not files).
_SPECIAL_CKPT = ("last", "best", "hpc")


def check_trainer_options(trainer: Namespace) -> None:
    """One-line KeeprError for the Trainer options Lightning would only reject with a traceback."""
    def get(name):
        return trainer.get(name) if trainer is not None else None

    for name, low in (("max_epochs", -1), ("max_steps", -1), ("min_epochs", 0), ("min_steps", 0),
                      ("log_every_n_steps", 0), ("check_val_every_n_epoch", 1), ("accumulate_grad_batches", 1),
                      ("num_sanity_val_steps", -1)):
        value = get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            no_limit = low == -1 and name != "num_sanity_val_steps"
            what = "-1 (no limit) or an integer >= 0" if no_limit else f"an integer >= {low}"
            raise KeeprError(f"trainer.{name} must be {what}, got {value!r}")
    for name in ("limit_train_batches", "limit_val_batches", "val_check_interval", "gradient_clip_val"):
        value = get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            raise KeeprError(f"trainer.{name} must be >= 0, got {value!r}")


class EncoderCLI(LightningCLI):
    def add_arguments_to_parser(self, parser):
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.monitor": "val/latent_mse",
            "checkpoint.mode": "min",
            "checkpoint.save_last": True,
            "checkpoint.save_top_k": 1,
            "checkpoint.filename": "epoch{epoch:03d}-step{step:06d}",
            "checkpoint.auto_insert_metric_name": False,
        })
        parser.add_lightning_class_args(ExportEncoder, "export")
        parser.link_arguments("data.root", "model.pairs_root")
        parser.set_defaults({
            "trainer.logger": {
                "class_path": "pytorch_lightning.loggers.WandbLogger",
                "init_args": {"project": "keepr-encoder", "save_dir": "outputs/encoder", "offline": True},
            },
        })

    def parse_arguments(self, parser, args) -> None:
        # LightningCLI reads --ckpt_path right after parsing (for its hyperparameters) with a bare torch.load:
        # check the file first, so a missing, damaged or unsafe checkpoint is one line and nothing else runs.
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as exc:
            raise KeeprError(f"bad option: {exc}") from None
        config = self._subconfig()
        ckpt_path = config.get("ckpt_path") if config is not None else None
        self._resume = None
        if ckpt_path and str(ckpt_path) not in _SPECIAL_CKPT and not str(ckpt_path).startswith("registry"):
            self._resume = (str(ckpt_path), read_training_checkpoint(ckpt_path))

    def _subconfig(self):
        sub = self.config.get("subcommand")
        return self.config[sub] if sub else self.config

    def before_instantiate_classes(self):
        config = self._subconfig()
        check_trainer_options(config.get("trainer"))
        model = config.get("model")
        if model is not None:
            check_hparams(**{k: v for k, v in vars(model).items() if not isinstance(v, Namespace)})
        # W&B stays offline unless the user chose a mode with WANDB_MODE.
        logger = config.get("trainer.logger")
        if isinstance(logger, Namespace) and str(logger.get("class_path", "")).endswith("WandbLogger"):
            if "WANDB_MODE" in os.environ:
                logger.init_args.offline = False

    def instantiate_trainer(self, **kwargs):
        try:
            return super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError, TypeError) as exc:
            raise KeeprError(f"bad trainer option: {exc}") from None

    def before_fit(self):
        # Everything is checked (the pair set and generator when the data and model were made): only now may the
        # run create its directories.
        if self._resume is not None:
            check_checkpoint_fits(self._resume[1], self.model, self._resume[0])
            self._resume = None  # Lightning reads it again; do not hold two copies
        logger = self._subconfig().get("trainer.logger")
        if isinstance(logger, Namespace) and str(logger.get("class_path", "")).endswith("WandbLogger"):
            if logger.init_args.get("save_dir"):
                os.makedirs(logger.init_args.save_dir, exist_ok=True)


@cli_main
def main(args=None):
    EncoderCLI(EncoderModule, PairDataModule, save_config_kwargs={"overwrite": True}, args=args,
               parser_kwargs={"exit_on_error": False})


if __name__ == "__main__":
    main()
