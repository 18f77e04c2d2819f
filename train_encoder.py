"""Train the image -> latent encoder on a pair directory (LightningCLI).

    python train_encoder.py fit --config configs/encoder/tiny.yaml
    python train_encoder.py fit --config configs/encoder/tiny.yaml --ckpt_path outputs/encoder_tiny/checkpoints/last.ckpt
    python train_encoder.py fit --config configs/encoder/ffhq256.yaml --data.root PAIRS --model.generator_path ffhq.pkl

Logging goes to Weights & Biases, offline unless WANDB_MODE is set. Checkpoints (``--checkpoint.*``, a
ModelCheckpoint on val/latent_mse) and the exported encoder (``--export.path``, default
``<checkpoint dir>/../encoder.safetensors``) are written when fit ends.
"""
from __future__ import annotations

import os

from jsonargparse import Namespace
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningCLI

from datasets.pairs import PairDataModule
from keepr.errors import cli_main
from training.encoder_module import EncoderModule, ExportEncoder


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

    def before_instantiate_classes(self):
        # W&B stays offline unless the user chose a mode with WANDB_MODE.
        config = self.config[self.subcommand] if self.subcommand else self.config
        logger = config.get("trainer.logger")
        if isinstance(logger, Namespace) and str(logger.get("class_path", "")).endswith("WandbLogger"):
            if "WANDB_MODE" in os.environ:
                logger.init_args.offline = False
            if logger.init_args.get("save_dir"):
                os.makedirs(logger.init_args.save_dir, exist_ok=True)


@cli_main
def main(args=None):
    EncoderCLI(EncoderModule, PairDataModule, save_config_kwargs={"overwrite": True}, args=args)


if __name__ == "__main__":
    main()
