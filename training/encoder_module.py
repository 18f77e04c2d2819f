"""Training the image -> latent encoder on (image, w) pairs made by a frozen StyleGAN2 generator.

``EncoderModule`` owns the trainable encoder; the generator is loaded from the pair set's manifest (or an explicit
path), kept frozen and outside the module's parameters so checkpoints stay small. ``ExportEncoder`` writes the
trained encoder to the file inference loads (see ``models.encoder.load_encoder``).
"""
from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import yaml
from torchmetrics import CatMetric, MeanMetric

from datasets.pairs import find_generator, load_manifest
from keepr.errors import KeeprError
from keepr.fileio import sha256_file
from keepr.images import to_float_image
from keepr.registry import missing
from keepr.weights import torch_load_weights
from models.encoder import Encoder, save_encoder

# ----------------------------------------------------------------------------


def resolve_generator(generator_path: Optional[str], pairs_root: Optional[str]) -> tuple[Path, str]:
    """The generator to train against and its sha256: ``generator_path`` if given, else the one the pair manifest
    names (its path relative to the pair directory, then its absolute path: :func:`datasets.pairs.find_generator`).

    With a pair set, the file must have the sha256 its manifest records (a generator that moved is given by its new
    path and checked): an encoder trained on pairs from another generator would be tied to the wrong one at export.
    """
    if pairs_root:
        manifest = load_manifest(pairs_root, require_complete=False)
        path = find_generator(pairs_root, generator_path, manifest)
        recorded = (manifest.get("generator") or {}).get("sha256")
        return path, recorded or sha256_file(path)
    if not generator_path:
        raise KeeprError("no generator: give model.generator_path or a pair directory whose manifest.json names one")
    path = Path(generator_path)
    if not path.is_file():
        raise missing("generator", path)
    return path, sha256_file(path)


def resolve_generator_path(generator_path: Optional[str], pairs_root: Optional[str]) -> Path:
    """The generator file of :func:`resolve_generator` (checked against the pair manifest's sha256)."""
    return resolve_generator(generator_path, pairs_root)[0]


def check_hparams(**hp: Any) -> None:
    """KeeprError (one line, naming the option) for a training option out of range; called before anything is loaded.

    Takes any subset of EncoderModule's arguments, so the command line can check them before building anything.
    """
    def bad(name: str, want: str) -> KeeprError:
        return KeeprError(f"model.{name} must be {want}, got {hp[name]!r}")

    def number(name: str) -> Optional[float]:
        value = hp.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad(name, "a finite number")
        return float(value)

    weights = [number(k) for k in ("latent_weight", "pixel_weight", "lpips_weight")]
    if any(w is not None and w < 0 for w in weights) or (None not in weights and sum(weights) <= 0):
        raise KeeprError(f"loss weights must be >= 0 and not all zero (latent {hp.get('latent_weight')}, "
                         f"pixel {hp.get('pixel_weight')}, lpips {hp.get('lpips_weight')})")
    if (lr := number("lr")) is not None and lr <= 0:
        raise bad("lr", "> 0")
    if hp.get("betas") is not None:
        betas = hp["betas"]
        if (not isinstance(betas, (list, tuple)) or len(betas) != 2
                or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0 for b in betas)):
            raise bad("betas", "two numbers in [0, 1)")
    for name in ("weight_decay", "input_noise"):
        if (v := number(name)) is not None and v < 0:
            raise bad(name, ">= 0")
    if (v := number("ema_decay")) is not None and not 0.0 <= v < 1.0:
        raise bad("ema_decay", "in [0, 1)")
    for name in ("warmup_steps", "log_images"):
        v = hp.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise bad(name, "an integer >= 0")
    if hp.get("lpips_net") is not None and hp["lpips_net"] not in ("alex", "vgg"):
        raise bad("lpips_net", "'alex' or 'vgg'")


def batch_seed(epoch: int, batch_idx: int, rank: int = 0) -> int:
    """Seed of the global RNG for one training batch: a function of the run's seed (``seed_everything``, exported by
    Lightning as PL_GLOBAL_SEED; 0 without it), the epoch, the batch index and the process rank."""
    base = int(os.environ.get("PL_GLOBAL_SEED", "0") or 0)
    return int(np.random.SeedSequence([base, int(epoch), int(batch_idx), int(rank)]).generate_state(1)[0])


class EncoderModule(pl.LightningModule):
    """Encoder training with weighted latent MSE, pixel L2 through the frozen generator, and optional LPIPS.

    Validation logs (``val/`` prefix): ``latent_mse``; ``latent_mse_wavg`` (the trivial predictor ``w_avg``) and
    ``latent_mse_ratio`` = latent_mse / latent_mse_wavg; ``latent_var`` (the MSE of the best constant predictor,
    the validation mean) and ``latent_mse_var_ratio``; ``latent_cos`` (cosine of predicted and true w) and
    ``offset_cos`` (cosine of their offsets from w_avg, 0 for the trivial predictor); ``pixel_mse`` (re-synthesis
    of the prediction against the pair image, both in [-1,1]) and ``pixel_mse_wavg`` (the same for w_avg's image).
    """

    def __init__(self,
        generator_path: Optional[str] = None,       # Generator file; default: the one named in the pair manifest.
        pairs_root: Optional[str] = None,           # Pair directory (linked from data.root by train_encoder.py).
        encoder: Optional[dict] = None,             # models.encoder.Encoder kwargs; w_dim/num_ws: the generator's.
        latent_weight: float = 1.0,                 # Weight of the latent MSE (the original design's loss).
        pixel_weight: float = 0.0,                  # Weight of the pixel L2 of the re-synthesised image.
        lpips_weight: float = 0.0,                  # Weight of LPIPS of the re-synthesised image (needs its weights).
        lpips_net: str = "alex",                    # LPIPS trunk: "alex" or "vgg".
        lpips_backbone_path: Optional[str] = None,  # torchvision ImageNet weights of the LPIPS trunk.
        lr: float = 1e-3,                           # Adam learning rate.
        betas: tuple[float, float] = (0.9, 0.999),  # Adam betas.
        weight_decay: float = 0.0,                  # AdamW weight decay.
        input_noise: float = 0.0,                   # Std of Gaussian noise added to training images (in [-1, 1] units):
                                                    # a label-preserving augmentation against overfitting the pairs.
        warmup_steps: int = 0,                      # Linear learning-rate warm-up.
        cosine_decay: bool = True,                  # Cosine decay to zero over the run's optimizer steps.
        log_images: int = 0,                        # Inputs/re-syntheses shown in the logger each validation (0: none).
        ema_decay: float = 0.0,                     # > 0: keep an exponential moving average of the encoder weights,
                                                    # validated and exported instead of the raw weights.
    ):
        super().__init__()
        self.save_hyperparameters()
        check_hparams(latent_weight=latent_weight, pixel_weight=pixel_weight, lpips_weight=lpips_weight, lr=lr,
                      betas=betas, weight_decay=weight_decay, input_noise=input_noise, warmup_steps=warmup_steps,
                      log_images=log_images, ema_decay=ema_decay, lpips_net=lpips_net)
        from models.stylegan2 import load_generator

        path, self.generator_sha256 = resolve_generator(generator_path, pairs_root)
        self.generator_path = str(path)
        G = load_generator(self.generator_path, device="cpu").eval().requires_grad_(False)
        object.__setattr__(self, "_G", G)  # Not a submodule: frozen, never in checkpoints or DDP.

        # Values given on the command line (--model.encoder.pool_size 4) arrive as strings: read them as YAML.
        kwargs = {k: yaml.safe_load(v) if isinstance(v, str) and k != "mode" else v for k, v in (encoder or {}).items()}
        for key in ("w_dim", "num_ws"):
            if key in kwargs and int(kwargs[key]) != int(getattr(G, key)):
                raise KeeprError(f"encoder.{key}={kwargs[key]} does not match the generator ({getattr(G, key)})")
        kwargs.update(w_dim=G.w_dim, num_ws=G.num_ws)
        kwargs.setdefault("img_resolution", G.img_resolution)
        kwargs.setdefault("img_channels", G.img_channels)
        self.encoder = Encoder(**kwargs)
        with torch.no_grad():
            self.encoder.w_avg.copy_(G.w_avg.detach().float().cpu())
        self.encoder_ema = copy.deepcopy(self.encoder).requires_grad_(False) if ema_decay > 0 else None

        self.lpips = None
        if lpips_weight > 0:
            from criteria.lpips_loss import LPIPSLoss
            self.lpips = LPIPSLoss(lpips_backbone_path, net=lpips_net)

        self.val_latent_mse = MeanMetric()
        self.val_latent_mse_wavg = MeanMetric()
        self.val_latent_cos = MeanMetric()
        self.val_offset_cos = MeanMetric()
        self.val_pixel_mse = MeanMetric()
        self.val_pixel_mse_wavg = MeanMetric()
        self.val_w = CatMetric()  # Validation latents, for the best constant predictor (their mean).

    # The generator follows the module's device without being registered as a submodule.
    @property
    def generator(self):
        if self._G.w_avg.device != self.device:
            self._G.to(self.device)
        return self._G

    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        # The LPIPS network is fixed user-supplied weights: not part of the checkpoint.
        for key in [k for k in state if k.startswith("lpips.")]:
            del state[key]
        return state

    def load_state_dict(self, state_dict, strict: bool = True, **kwargs):
        if self.lpips is not None:
            state_dict = dict(state_dict)
            state_dict.update({f"lpips.{k}": v for k, v in self.lpips.state_dict().items()})
        return super().load_state_dict(state_dict, strict=strict, **kwargs)

    @property
    def eval_encoder(self) -> Encoder:
        """The weights validated and exported: the moving average when ``ema_decay > 0``."""
        return self.encoder_ema if self.encoder_ema is not None else self.encoder

    def on_train_batch_start(self, batch, batch_idx):
        # Dropout and input noise draw from the global RNG, whose state Lightning does not checkpoint (and which model
        # init, the sanity check and data loading also consume): seed it per batch from (seed, epoch, batch, rank), so
        # a run resumed from an end-of-epoch checkpoint draws exactly what the uninterrupted run drew.
        torch.manual_seed(batch_seed(self.current_epoch, batch_idx, self.global_rank))

    @torch.no_grad()
    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.encoder_ema is None:
            return
        decay = min(self.hparams.ema_decay, (1 + self.global_step) / (10 + self.global_step))  # Warm-up of the average.
        for p_ema, p in zip(self.encoder_ema.parameters(), self.encoder.parameters(), strict=True):
            p_ema.lerp_(p, 1.0 - decay)
        for b_ema, b in zip(self.encoder_ema.buffers(), self.encoder.buffers(), strict=True):
            b_ema.copy_(b)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["encoder_config"] = dict(self.encoder.init_kwargs)
        checkpoint["generator_path"] = self.generator_path
        checkpoint["generator_sha256"] = self.generator_sha256

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.encoder(img)

    def target_ws(self, w: torch.Tensor) -> torch.Tensor:
        """Pair latents [N,w_dim] (or [N,num_ws,w_dim]) -> ws [N,num_ws,w_dim]."""
        if w.ndim == 2:
            w = w.unsqueeze(1).expand(-1, self.encoder.num_ws, -1)
        assert w.shape[1:] == (self.encoder.num_ws, self.encoder.w_dim), f"unexpected w shape {tuple(w.shape)}"
        return w.float()

    def synthesize(self, ws: torch.Tensor) -> torch.Tensor:
        return self.generator.synthesis(ws, noise_mode="const")

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted training loss on one batch and its parts."""
        hp = self.hparams
        img = to_float_image(batch["image"])
        target = self.target_ws(batch["w"])
        x = img
        if self.training and hp.input_noise > 0:
            x = img + hp.input_noise * torch.randn_like(img)
        ws = self.encoder(x)
        parts = {}
        loss = img.new_zeros(())
        if hp.latent_weight > 0:
            parts["latent_mse"] = F.mse_loss(ws, target)
            loss = loss + hp.latent_weight * parts["latent_mse"]
        if hp.pixel_weight > 0 or hp.lpips_weight > 0:
            synth = self.synthesize(ws)
            if synth.shape[-2:] != img.shape[-2:]:
                synth = F.interpolate(synth, size=img.shape[-2:], mode="bilinear", align_corners=False, antialias=True)
            if hp.pixel_weight > 0:
                parts["pixel_mse"] = F.mse_loss(synth, img)
                loss = loss + hp.pixel_weight * parts["pixel_mse"]
            if hp.lpips_weight > 0:
                parts["lpips"] = self.lpips(synth, img)
                loss = loss + hp.lpips_weight * parts["lpips"]
        parts["loss"] = loss
        return loss, parts

    def training_step(self, batch, batch_idx):
        loss, parts = self.compute_loss(batch)
        n = batch["image"].shape[0]
        self.log_dict({f"train/{k}": v.detach() for k, v in parts.items()}, prog_bar=False, batch_size=n)
        self.log("loss", loss.detach(), prog_bar=True, logger=False, batch_size=n)
        return loss

    @torch.no_grad()
    def validation_step(self, batch, batch_idx):
        img = to_float_image(batch["image"])
        target = self.target_ws(batch["w"])
        ws = self.eval_encoder(img)
        w_avg = self.encoder.w_avg.reshape(1, 1, -1)
        n = img.shape[0]
        self.val_latent_mse.update((ws - target).square().mean(dim=(1, 2)))
        self.val_latent_mse_wavg.update((w_avg - target).square().mean(dim=(1, 2)))
        self.val_latent_cos.update(F.cosine_similarity(ws, target, dim=2).mean(dim=1))
        self.val_offset_cos.update(F.cosine_similarity(ws - w_avg, target - w_avg, dim=2).mean(dim=1))
        self.val_w.update(target[:, 0])
        synth = self.synthesize(torch.cat([ws, w_avg.expand(1, ws.shape[1], -1)]))
        if synth.shape[-2:] != img.shape[-2:]:
            synth = F.interpolate(synth, size=img.shape[-2:], mode="bilinear", align_corners=False, antialias=True)
        synth, synth_avg = synth[:n], synth[n:]
        self.val_pixel_mse.update((synth - img).square().mean(dim=(1, 2, 3)))
        self.val_pixel_mse_wavg.update((synth_avg - img).square().mean(dim=(1, 2, 3)))
        if batch_idx == 0 and self.hparams.log_images > 0:
            self._log_images(img[: self.hparams.log_images], synth[: self.hparams.log_images])

    def on_validation_epoch_end(self):
        mse = self.val_latent_mse.compute()
        mse_wavg = self.val_latent_mse_wavg.compute()
        w = self.val_w.compute().reshape(-1, self.encoder.w_dim)
        var = (w - w.mean(dim=0)).square().mean()
        metrics = {
            "val/latent_mse": mse,
            "val/latent_mse_wavg": mse_wavg,
            "val/latent_mse_ratio": mse / mse_wavg,
            "val/latent_var": var,
            "val/latent_mse_var_ratio": mse / var,
            "val/latent_cos": self.val_latent_cos.compute(),
            "val/offset_cos": self.val_offset_cos.compute(),
            "val/pixel_mse": self.val_pixel_mse.compute(),
            "val/pixel_mse_wavg": self.val_pixel_mse_wavg.compute(),
        }
        self.log_dict(metrics, prog_bar=False, sync_dist=False)  # Already reduced across processes by torchmetrics.
        self.log("val_ratio", metrics["val/latent_mse_ratio"], prog_bar=True, logger=False)
        if not self.trainer.sanity_checking:
            self.print(f"epoch {self.current_epoch} step {self.global_step}: " +
                       " ".join(f"{k[4:]}={v.item():.4g}" for k, v in metrics.items()))
        for m in (self.val_latent_mse, self.val_latent_mse_wavg, self.val_latent_cos, self.val_offset_cos,
                  self.val_pixel_mse, self.val_pixel_mse_wavg, self.val_w):
            m.reset()

    def _log_images(self, img: torch.Tensor, synth: torch.Tensor) -> None:
        logger = self.logger
        if logger is None or not hasattr(logger, "log_image") or not self.trainer.is_global_zero:
            return
        from torchvision.utils import make_grid
        grid = make_grid(torch.cat([img, synth.clamp(-1, 1)]).cpu(), nrow=img.shape[0], normalize=True,
                         value_range=(-1, 1))
        logger.log_image(key="val/inputs_and_resyntheses", images=[grid], step=self.global_step)

    def configure_optimizers(self):
        hp = self.hparams
        opt = torch.optim.AdamW(self.encoder.parameters(), lr=hp.lr, betas=tuple(hp.betas),
                                weight_decay=hp.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1) if self._trainer is not None else 1

        def factor(step: int) -> float:
            if hp.warmup_steps > 0 and step < hp.warmup_steps:
                return (step + 1) / hp.warmup_steps
            if not hp.cosine_decay:
                return 1.0
            t = min(max(step - hp.warmup_steps, 0) / max(total - hp.warmup_steps, 1), 1.0)
            return 0.5 * (1.0 + math.cos(math.pi * t))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


# ----------------------------------------------------------------------------


def read_training_checkpoint(ckpt_path: str | os.PathLike) -> dict:
    """A checkpoint written by training this module, read with ``weights_only=True`` (nothing in it can run code).

    KeeprError (one line) when the file is missing, truncated, holds Python objects besides tensors and plain data,
    or is not an encoder training checkpoint.
    """
    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise KeeprError(f"{ckpt_path}: checkpoint not found")
    ckpt = torch_load_weights(ckpt_path, "training checkpoint")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict) or "global_step" not in ckpt:
        raise KeeprError(f"{ckpt_path}: not a Lightning training checkpoint (no state_dict and global_step); "
                         f"give a .ckpt written by train_encoder.py")
    if "encoder_config" not in ckpt or not any(str(k).startswith("encoder.") for k in ckpt["state_dict"]):
        raise KeeprError(f"{ckpt_path}: not an encoder training checkpoint (no encoder weights or config; made by "
                         f"another model?)")
    return ckpt


def check_checkpoint_fits(ckpt: dict, module: pl.LightningModule, ckpt_path: str | os.PathLike) -> None:
    """KeeprError unless the checkpoint's weights have exactly the names and shapes of ``module``'s."""
    own, theirs = module.state_dict(), ckpt["state_dict"]
    missing = [k for k in own if k not in theirs]
    unexpected = [k for k in theirs if k not in own]
    shapes = [f"{k} {list(theirs[k].shape)} != {list(v.shape)}" for k, v in own.items()
              if k in theirs and isinstance(theirs[k], torch.Tensor) and theirs[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = [f"missing {missing[:3]}" if missing else "", f"unexpected {unexpected[:3]}" if unexpected else "",
                 f"shapes {shapes[:3]}" if shapes else ""]
        why = "; ".join(p for p in parts if p)
        raise KeeprError(f"{ckpt_path}: checkpoint does not fit this model's encoder ({why}); "
                         f"resume with the encoder and ema_decay settings it was trained with")


def load_encoder_from_checkpoint(ckpt_path: str | os.PathLike, template: Encoder | None = None) -> Encoder:
    """The encoder of a training checkpoint (its moving average if it has one), read with ``weights_only=True``."""
    ckpt = read_training_checkpoint(ckpt_path)
    weights = ckpt.get("state_dict", {})
    prefix = "encoder_ema." if any(k.startswith("encoder_ema.") for k in weights) else "encoder."
    state = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    if not state:
        raise KeeprError(f"{ckpt_path}: no encoder weights in this checkpoint")
    if template is None:
        if "encoder_config" not in ckpt:
            raise KeeprError(f"{ckpt_path}: checkpoint does not record the encoder config (not made by EncoderModule)")
        template = Encoder(**ckpt["encoder_config"])
    encoder = Encoder(**template.init_kwargs)
    encoder.load_state_dict(state)
    return encoder.eval()


def checkpoint_generator_path(ckpt_path: str | os.PathLike) -> Optional[str]:
    """The generator path a training checkpoint was made with (None if not recorded)."""
    return read_training_checkpoint(ckpt_path).get("generator_path")


def checkpoint_generator_sha256(ckpt_path: str | os.PathLike) -> Optional[str]:
    """The sha256 of the generator a training checkpoint was made with (None in checkpoints older than this record):
    pass it to ``save_encoder(generator_sha256=...)`` so an export given a generator that moved is checked."""
    return read_training_checkpoint(ckpt_path).get("generator_sha256")


class ExportEncoder(pl.Callback):
    """After fit, write the encoder (best checkpoint by the monitored metric if any, else the final weights) to
    ``path``.

    ``path`` defaults to ``encoder.safetensors`` next to the checkpoint directory. The file records the generator's
    path and sha256; load it with ``models.encoder.load_encoder(path, generator_path)``.
    """

    def __init__(self,
        path: Optional[str] = None,     # Output file (.safetensors).
        use_best: bool = True,          # Export the best checkpoint rather than the last weights.
    ):
        super().__init__()
        self.path = path
        self.use_best = use_best
        self.exported: Optional[Path] = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: EncoderModule) -> None:
        ckpt_cb = trainer.checkpoint_callback
        path = self.path
        if path is None:
            has_dir = ckpt_cb is not None and ckpt_cb.dirpath
            base = Path(ckpt_cb.dirpath).parent if has_dir else Path(trainer.default_root_dir)
            path = str(base / "encoder.safetensors")
        if not trainer.is_global_zero:
            return
        encoder, source = pl_module.eval_encoder, "final weights"
        best = getattr(ckpt_cb, "best_model_path", "") if ckpt_cb is not None else ""
        if self.use_best and best and Path(best).is_file():
            encoder, source = load_encoder_from_checkpoint(best, template=pl_module.encoder), best
        extra = {"source": str(source), "global_step": int(trainer.global_step)}
        if ckpt_cb is not None and ckpt_cb.best_model_score is not None:
            extra[str(ckpt_cb.monitor)] = float(ckpt_cb.best_model_score)
        self.exported = save_encoder(encoder, path, pl_module.generator_path, extra=extra,
                                     generator_sha256=pl_module.generator_sha256)
        print(f"exported encoder ({source}) to {self.exported}")
