"""Encoder: heads, one optimisation step, resume, export round trip, LPIPS without weights, CLI fit (1 and 2
devices), a copied pair set and a moved generator."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from keepr.errors import KeeprError, MissingWeightsError

ROOT = Path(__file__).resolve().parents[1]
TINY_ENCODER = dict(mode="w", channels=[8, 16, 16, 16], blocks=[1, 1, 1, 1], stem_stride=2, pool_size=2, hidden_dim=32)
NUM_PAIRS = 64


@pytest.fixture(scope="session")
def tiny_setup(tmp_path_factory):
    """Tiny generator (seed 0) saved to disk, a second one (seed 1), and 64 pairs made with generate_pairs.py."""
    from models.stylegan2 import make_tiny_generator

    d = tmp_path_factory.mktemp("encoder")
    gen = d / "generator_tiny.safetensors"
    make_tiny_generator(0).save(gen)
    other = d / "generator_other.safetensors"
    make_tiny_generator(1).save(other)
    pairs = d / "pairs"
    subprocess.run([sys.executable, "generate_pairs.py", "--config", "configs/pairs/tiny.yaml", "--generator", str(gen),
                    "--out_dir", str(pairs), "--num_pairs", str(NUM_PAIRS)], cwd=ROOT, check=True,
                   capture_output=True, text=True)
    return {"dir": d, "generator": gen, "other_generator": other, "pairs": pairs}


def make_module(setup, **kwargs):
    from training.encoder_module import EncoderModule

    kwargs.setdefault("encoder", TINY_ENCODER)
    return EncoderModule(pairs_root=str(setup["pairs"]), **kwargs)


def fixed_batch(setup, n=16):
    from datasets.pairs import PairDataset

    ds = PairDataset(setup["pairs"])
    items = [ds[i] for i in range(n)]
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


# ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["w", "w+"])
def test_heads_shapes_and_start_at_w_avg(mode):
    from models.encoder import Encoder

    enc = Encoder(w_dim=24, num_ws=6, img_resolution=32, mode=mode, channels=[8, 16], blocks=[1, 2],
                  hidden_dim=16).eval()
    enc.w_avg.copy_(torch.randn(24))
    x = torch.rand(3, 3, 48, 40) * 2 - 1  # any input size is resized to img_resolution
    ws = enc(x)
    assert ws.shape == (3, 6, 24)
    # Zero-initialised last layer: an untrained encoder is the trivial w_avg predictor.
    assert torch.allclose(ws, enc.w_avg.expand(3, 6, 24))
    torch.nn.init.normal_(enc.head[-1].weight)
    ws = enc(x)
    same_layers = torch.allclose(ws, ws[:, :1].expand_as(ws))
    assert same_layers == (mode == "w")  # W broadcasts one w; W+ predicts one per layer
    with pytest.raises(ValueError):
        Encoder(mode="z")


def test_one_step_changes_weights_and_lowers_loss(tiny_setup):
    torch.manual_seed(0)
    module = make_module(tiny_setup, lr=1e-3, warmup_steps=0, cosine_decay=False)
    module.train()
    batch = fixed_batch(tiny_setup)
    opt = torch.optim.Adam(module.encoder.parameters(), lr=1e-3)
    before = {k: v.clone() for k, v in module.encoder.state_dict().items()}
    loss0, parts = module.compute_loss(batch)
    assert set(parts) == {"latent_mse", "loss"}
    opt.zero_grad()
    loss0.backward()
    opt.step()
    with torch.no_grad():
        loss1, _ = module.compute_loss(batch)
    changed = [k for k, v in module.encoder.state_dict().items()
               if k.endswith("weight") and not torch.equal(v, before[k])]
    assert changed, "no weight changed"
    assert loss1.item() < loss0.item()
    # The generator is frozen and not part of the module's state.
    assert not any(k.startswith("_G") or "synthesis" in k for k in module.state_dict())
    assert all(not p.requires_grad for p in module.generator.parameters())


def test_ema_weights_follow_and_are_exported(tiny_setup):
    module = make_module(tiny_setup, ema_decay=0.5)
    opt = torch.optim.Adam(module.encoder.parameters(), lr=1e-2)
    loss, _ = module.compute_loss(fixed_batch(tiny_setup, 8))
    loss.backward()
    opt.step()
    before = module.encoder_ema.head[-1].weight.clone()
    module.on_train_batch_end(None, None, 0)
    after, raw = module.encoder_ema.head[-1].weight, module.encoder.head[-1].weight
    assert not torch.equal(after, before) and not torch.equal(after, raw)
    assert module.eval_encoder is module.encoder_ema
    assert any(k.startswith("encoder_ema.") for k in module.state_dict())


def test_pixel_loss_reaches_encoder(tiny_setup):
    module = make_module(tiny_setup, latent_weight=0.0, pixel_weight=1.0)
    torch.nn.init.normal_(module.encoder.head[-1].weight, std=0.01)
    loss, parts = module.compute_loss(fixed_batch(tiny_setup, 4))
    assert set(parts) == {"pixel_mse", "loss"}
    loss.backward()
    assert module.encoder.head[-1].weight.grad.abs().sum() > 0


def test_lpips_without_weights_fails_clearly(tiny_setup, tmp_path):
    with pytest.raises(KeeprError, match="LPIPS"):
        make_module(tiny_setup, lpips_weight=1.0)
    with pytest.raises(MissingWeightsError, match="alexnet"):
        make_module(tiny_setup, lpips_weight=1.0, lpips_backbone_path=str(tmp_path / "nope.pth"))


def test_wrong_generator_for_pairs_is_refused(tiny_setup):
    with pytest.raises(KeeprError, match="made the pairs"):
        make_module(tiny_setup, generator_path=str(tiny_setup["other_generator"]))


def test_export_round_trip_and_wrong_generator(tiny_setup, tmp_path):
    from models.encoder import load_encoder, save_encoder

    module = make_module(tiny_setup, encoder=dict(TINY_ENCODER, mode="w+"))
    torch.nn.init.normal_(module.encoder.head[-1].weight, std=0.1)
    enc = module.encoder.eval()
    path = save_encoder(enc, tmp_path / "enc.safetensors", tiny_setup["generator"])
    loaded = load_encoder(path, tiny_setup["generator"])
    x = fixed_batch(tiny_setup, 4)["image"].float() / 127.5 - 1
    with torch.no_grad():
        assert torch.equal(loaded(x), enc(x))
    assert not loaded.training and loaded.mode == "w+"
    with pytest.raises(KeeprError, match="trained for generator"):
        load_encoder(path, tiny_setup["other_generator"])
    with pytest.raises(MissingWeightsError):
        load_encoder(tmp_path / "missing.safetensors", tiny_setup["generator"])


def _train_two_steps(module, pairs):
    import pytorch_lightning as pl

    from datasets.pairs import PairDataModule

    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                         limit_val_batches=1, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=PairDataModule(str(pairs), batch_size=8, val_fraction=0.25))
    assert trainer.global_step == 2


def test_pair_set_copied_with_its_generator_trains(tiny_setup, tmp_path):
    """A pair set copied elsewhere together with its generator trains against the copy (the manifest's path is
    relative to the pair set), and the export is bound to it."""
    from models.encoder import load_encoder, save_encoder

    pairs = tmp_path / "pairs"
    shutil.copytree(tiny_setup["pairs"], pairs)
    gen = tmp_path / tiny_setup["generator"].name  # same place relative to the pairs as the original
    shutil.copy2(tiny_setup["generator"], gen)
    module = make_module({"pairs": pairs})
    assert module.generator_path == str(gen)
    _train_two_steps(module, pairs)
    out = save_encoder(module.encoder, tmp_path / "enc.safetensors", module.generator_path,
                       generator_sha256=module.generator_sha256)
    load_encoder(out, gen)


def test_moved_generator_is_given_by_path_and_checked(tiny_setup, tmp_path):
    """Pairs whose generator moved: training finds it by --model.generator_path (checked against the manifest's
    sha256); another file is refused in one line naming both hashes, at training and at export."""
    import generate_pairs
    from keepr.fileio import sha256_file
    from models.encoder import load_encoder, save_encoder
    from train_encoder import main

    home = tmp_path / "weights" / "g.safetensors"
    home.parent.mkdir()
    shutil.copy2(tiny_setup["generator"], home)
    pairs = tmp_path / "pairs"
    assert generate_pairs.main(["--config", str(ROOT / "configs/pairs/tiny.yaml"), "--generator", str(home),
                                "--out_dir", str(pairs), "--num_pairs", "16", "--shard_size", "8",
                                "--trainer.enable_progress_bar", "false"]) == 0
    moved = tmp_path / "moved.safetensors"
    home.rename(moved)
    with pytest.raises(MissingWeightsError, match="--model.generator_path"):
        make_module({"pairs": pairs})
    module = make_module({"pairs": pairs}, generator_path=str(moved))
    assert module.generator_path == str(moved)
    _train_two_steps(module, pairs)

    right, wrong = sha256_file(moved), sha256_file(tiny_setup["other_generator"])
    with pytest.raises(KeeprError) as err:
        make_module({"pairs": pairs}, generator_path=str(tiny_setup["other_generator"]))
    assert right in str(err.value) and wrong in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(KeeprError) as err:
        save_encoder(module.encoder, tmp_path / "enc.safetensors", tiny_setup["other_generator"],
                     generator_sha256=module.generator_sha256)
    assert right in str(err.value) and wrong in str(err.value) and not (tmp_path / "enc.safetensors").exists()
    out = save_encoder(module.encoder, tmp_path / "enc.safetensors", moved, generator_sha256=module.generator_sha256)
    assert load_encoder(out, moved).w_dim == 64
    with pytest.raises(KeeprError) as err:
        load_encoder(out, tiny_setup["other_generator"])
    assert right in str(err.value) and wrong in str(err.value)
    with pytest.raises(MissingWeightsError, match="gone.safetensors"):  # a missing generator, not a NameError
        load_encoder(out, tmp_path / "gone.safetensors")

    # The command line: --model.generator_path finds it (one step, nothing logged).
    base = ["fit", "--config", str(ROOT / "configs/encoder/tiny.yaml"), "--data.root", str(pairs),
            "--data.batch_size", "8", "--data.val_fraction", "0.25", "--model.encoder", str(TINY_ENCODER),
            "--trainer.logger", "false", "--trainer.max_steps", "1", "--trainer.max_epochs", "-1",
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path / "run"),
            "--checkpoint.dirpath", str(tmp_path / "ckpt"),
            "--export.path", str(tmp_path / "cli.safetensors")]
    main(base + ["--model.generator_path", str(moved)])
    load_encoder(tmp_path / "cli.safetensors", moved)
    assert (tmp_path / "run" / "config.yaml").is_file()  # not in the working directory


class _FirstStep(__import__("pytorch_lightning").Callback):
    def __init__(self):
        self.first = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.first is None:
            self.first = trainer.global_step


def test_resume_continues_at_the_right_step(tiny_setup, tmp_path):
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint

    from datasets.pairs import PairDataModule

    def fit(max_steps, ckpt_path=None):
        pl.seed_everything(0)
        rec = _FirstStep()
        ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1)
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, callbacks=[ckpt, rec],
                             limit_val_batches=1, enable_progress_bar=False, enable_model_summary=False)
        dm = PairDataModule(str(tiny_setup["pairs"]), batch_size=8, val_fraction=0.25)
        module = make_module(tiny_setup)
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        return trainer, module, rec

    t1, m1, r1 = fit(3)
    assert (t1.global_step, r1.first) == (3, 0)
    last = tmp_path / "ckpt" / "last.ckpt"
    assert last.is_file()
    # Checkpoints hold the encoder only (no generator weights) and load with weights_only=True.
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert all(k.startswith("encoder.") for k in ckpt["state_dict"])
    t2, m2, r2 = fit(5, ckpt_path=str(last))
    assert (r2.first, t2.global_step) == (3, 5)


def _cli(args, tmp_path, env_extra=None, timeout=240):
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", **(env_extra or {}))
    return subprocess.run([sys.executable, "train_encoder.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _cli_args(setup, tmp_path, max_steps):
    return ["fit", "--config", "configs/encoder/tiny.yaml",
            "--data.root", str(setup["pairs"]), "--data.batch_size", "8", "--data.val_fraction", "0.25",
            "--model.encoder", yaml.safe_dump(TINY_ENCODER, default_flow_style=True).strip(),
            "--trainer.max_steps", str(max_steps), "--trainer.max_epochs", "-1", "--trainer.log_every_n_steps", "1",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"),
            "--checkpoint.dirpath", str(tmp_path / "ckpt"), "--export.path", str(tmp_path / "encoder.safetensors")]


@pytest.mark.slow
def test_cli_fit_exports_a_loadable_encoder(tiny_setup, tmp_path):
    from models.encoder import load_encoder

    res = _cli(_cli_args(tiny_setup, tmp_path, 4), tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    enc = load_encoder(tmp_path / "encoder.safetensors", tiny_setup["generator"])
    assert (enc.num_ws, enc.w_dim, enc.img_resolution) == (10, 64, 64)
    assert (tmp_path / "ckpt" / "last.ckpt").is_file()
    assert list((tmp_path / "logs" / "wandb").glob("offline-run-*")), "W&B did not log offline"
    # Resume through the CLI and the export script.
    res = _cli(_cli_args(tiny_setup, tmp_path, 6) + ["--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt")], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 6
    out = tmp_path / "exported.safetensors"
    res = subprocess.run([sys.executable, "-m", "scripts.export_encoder", "--ckpt",
                          str(tmp_path / "ckpt" / "last.ckpt"), "--out", str(out)], cwd=ROOT, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr
    load_encoder(out, tiny_setup["generator"])


def test_cli_missing_pairs_is_one_line_error(tmp_path, capsys):
    from train_encoder import main

    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(ROOT / "configs/encoder/tiny.yaml"), "--data.root", str(tmp_path / "nothing"),
              "--trainer.logger", "false"])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "manifest.json" in err[-1]


@pytest.mark.slow
def test_cli_ddp_two_cpu_devices(tiny_setup, tmp_path):
    from models.encoder import load_encoder

    args = _cli_args(tiny_setup, tmp_path, 3) + ["--trainer.devices", "2", "--trainer.strategy", "ddp"]
    res = _cli(args, tmp_path, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3
    load_encoder(tmp_path / "encoder.safetensors", tiny_setup["generator"])


@pytest.mark.slow
def test_eval_writes_tables_and_figure(tiny_setup, tmp_path, media_dir):
    from eval.encoder import main
    from models.encoder import save_encoder

    module = make_module(tiny_setup)
    enc_path = save_encoder(module.encoder.eval(), tmp_path / "enc.safetensors", tiny_setup["generator"])
    photos = media_dir / "photos" / "london_512"
    paths = main(["--encoder", str(enc_path), "--pairs", str(tiny_setup["pairs"]), "--val_fraction", "0.25",
                  "--photos", str(photos), "--out", str(tmp_path / "eval")])
    for p in paths.values():
        assert p.is_file() and p.stat().st_size > 0
    rows = (tmp_path / "eval" / "encoder_photos.csv").read_text().splitlines()
    assert len(rows) == 1 + 10
    md = paths["markdown"].read_text()
    assert "latent_mse_wavg" in md
    # An untrained encoder predicts w_avg exactly: its latent MSE equals the baseline.
    pairs = dict(line.split(",") for line in (tmp_path / "eval" / "encoder_pairs.csv").read_text().splitlines()[1:])
    assert float(pairs["latent_mse_ratio"]) == pytest.approx(1.0, abs=1e-6)


def test_encoder_options_from_command_line_strings(tiny_setup):
    """--model.encoder.<key> values arrive as strings; they are read as YAML (so "false" is False, not True)."""
    module = make_module(tiny_setup, encoder=dict(mode="w+", channels="[8, 16]", blocks="[1, 1]", stem_stride="2",
                                                   pool_size="1", hidden_dim="16", use_se="false", dropout="0.25"))
    cfg = module.encoder.init_kwargs
    assert cfg["mode"] == "w+" and cfg["channels"] == [8, 16] and cfg["pool_size"] == 1 and cfg["dropout"] == 0.25
    assert cfg["use_se"] is False


def test_dropout_and_input_noise_only_while_training(tiny_setup):
    """Dropout (head) and input noise (augmentation) act in training only; evaluation is deterministic."""
    module = make_module(tiny_setup, encoder=dict(TINY_ENCODER, dropout=0.5), input_noise=0.2)
    with torch.no_grad():
        for p in module.encoder.head[-1].parameters():
            p.normal_(0, 0.1)  # Leave the zero init, so dropout changes the output.
    batch = fixed_batch(tiny_setup, 4)
    module.eval()
    assert torch.equal(module.compute_loss(batch)[0], module.compute_loss(batch)[0])
    module.train()
    assert not torch.equal(module.compute_loss(batch)[0], module.compute_loss(batch)[0])
    with pytest.raises(KeeprError, match="input_noise"):
        make_module(tiny_setup, input_noise=-0.1)
