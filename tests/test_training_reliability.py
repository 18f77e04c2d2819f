"""Issue 12 (reliability): train_encoder.py refuses bad input in one line before creating anything, weight-file
messages are one complete sentence without torch's advice, and a resumed encoder run is bit-exact on the CPU."""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from keepr.errors import KeeprError, MissingWeightsError

ROOT = Path(__file__).resolve().parents[1]
TINY_ENCODER = dict(mode="w", channels=[8, 16, 16, 16], blocks=[1, 1, 1, 1], stem_stride=2, pool_size=2, hidden_dim=32)
NUM_PAIRS = 48


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny generator and 48 pairs made with generate_pairs.py (in-process)."""
    import generate_pairs
    from models.stylegan2 import make_tiny_generator

    d = tmp_path_factory.mktemp("reliability")
    gen = d / "generator_tiny.safetensors"
    make_tiny_generator(0).save(gen)
    pairs = d / "pairs"
    assert generate_pairs.main(["--config", str(ROOT / "configs/pairs/tiny.yaml"), "--generator", str(gen),
                                "--out_dir", str(pairs), "--num_pairs", str(NUM_PAIRS),
                                "--trainer.enable_progress_bar", "false"]) == 0
    return {"dir": d, "generator": gen, "pairs": pairs}


class Evil:
    """Unpickling this creates a file: a checkpoint holding it must be refused without running it."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def assert_one_clean_line(text: str, *words: str) -> str:
    """The message is one line, names ``words``, and neither quotes torch's advice nor shows a traceback."""
    assert "\n" not in text.strip() and "Traceback" not in text, text
    assert "weights_only" not in text and "trust" not in text, text
    for w in words:
        assert w in text, (w, text)
    return text


# ----------------------------------------------------------------------------------------------------------------------
# Weight-file messages (point 11).

def test_weight_file_messages_are_one_complete_sentence(tmp_path):
    from keepr.weights import read_state_dict
    from models.cosegmentation.loader import load_cosegmentation
    from models.encoder import load_encoder
    from models.stylegan2 import load_generator

    marker = tmp_path / "executed"
    torch.save({"w": torch.ones(2), "x": Evil(marker)}, tmp_path / "evil.pt")
    torch.save({"w": torch.ones(1000)}, tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    cases = [
        (lambda: read_state_dict(tmp_path / "evil.pt", "LPIPS backbone"), "evil.pt", "code"),
        (lambda: read_state_dict(tmp_path / "trunc.pt", "LPIPS backbone"), "trunc.pt", "truncated or corrupt"),
        (lambda: load_generator(tmp_path / "evil.pt"), "evil.pt", "code"),
        (lambda: load_generator(tmp_path / "trunc.pt"), "trunc.pt", "truncated or corrupt"),
        (lambda: load_cosegmentation(tmp_path / "evil.pt", ROOT / "configs/cosegmentation/vox-256-10segments.yaml"),
         "evil.pt", "code"),
    ]
    for fn, name, cause in cases:
        with pytest.raises(KeeprError) as err:
            fn()
        msg = assert_one_clean_line(str(err.value), name, cause)
        assert msg.endswith("."), msg  # a complete sentence, not cut at a character count
    assert not marker.exists()
    # A missing encoder is trained, not downloaded.
    with pytest.raises(MissingWeightsError) as err:
        load_encoder(tmp_path / "encoder.safetensors", None)
    msg = str(err.value)
    assert "download" not in msg and "train it" not in msg and "get it from: a training run" in msg
    assert "train_encoder.py fit" in msg


# ----------------------------------------------------------------------------------------------------------------------
# train_encoder.py: one line, nothing created (points 10, 11).

def _make_checkpoint(setup, path: Path, state: dict | None = None, **extra) -> Path:
    """A checkpoint shaped like Lightning's (no hyper_parameters, so LightningCLI does not rewrite the config)."""
    from training.encoder_module import EncoderModule

    if state is None:
        module = EncoderModule(pairs_root=str(setup["pairs"]), encoder=TINY_ENCODER)
        state = module.state_dict()
    torch.save({"state_dict": state, "epoch": 0, "global_step": 1, "encoder_config": dict(TINY_ENCODER), **extra}, path)
    return path


def test_cli_bad_input_is_one_line_and_creates_nothing(setup, tmp_path, capsys):
    import shutil

    from train_encoder import main

    out = tmp_path / "run"
    marker = tmp_path / "executed"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"encoder.x": torch.zeros(1)}, "global_step": 0, "hook": Evil(marker)}, evil)
    plain_evil = tmp_path / "plain_evil.ckpt"
    plain_evil.write_bytes(pickle.dumps(Evil(marker)))
    good = _make_checkpoint(setup, tmp_path / "good.ckpt")
    data = good.read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    other = _make_checkpoint(setup, tmp_path / "other.ckpt", state={"encoder.head.9.weight": torch.zeros(3)})
    torch.save({"weights": torch.zeros(2)}, tmp_path / "not_lightning.ckpt")
    from keepr.fileio import sha256_file
    from models.stylegan2 import make_tiny_generator

    other_generator = tmp_path / "other_generator.safetensors"
    make_tiny_generator(1).save(other_generator)
    changed = tmp_path / "changed_pairs"
    shutil.copytree(setup["pairs"], changed)
    shard = changed / "shard_00000.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))

    cases = [
        (["--model.lr", "-0.1"], "model.lr"),
        (["--model.lr", "abc"], "model.lr"),
        (["--trainer.max_epochs", "-3"], "max_epochs"),
        (["--trainer.max_steps", "-5"], "max_steps"),
        (["--model.ema_decay", "1.5"], "ema_decay"),
        (["--data.batch_size", "0"], "batch_size"),
        (["--model.generator_path", str(tmp_path / "missing.pkl")], "missing.pkl"),
        # Another generator than the one that made the pairs: both hashes named.
        (["--model.generator_path", str(other_generator)], sha256_file(other_generator)),
        (["--model.generator_path", str(other_generator)], sha256_file(setup["generator"])),
        (["--ckpt_path", str(tmp_path / "missing.ckpt")], "missing.ckpt: checkpoint not found"),
        (["--ckpt_path", str(tmp_path / "truncated.ckpt")], "truncated or corrupt"),
        (["--ckpt_path", str(evil)], "can run code"),
        (["--ckpt_path", str(plain_evil)], "can run code"),
        (["--ckpt_path", str(tmp_path / "not_lightning.ckpt")], "not a Lightning training checkpoint"),
        (["--ckpt_path", str(other)], "does not fit"),
        (["--data.root", str(changed)], "sha256 differs"),
    ]
    for extra, word in cases:
        args = ["fit", "--config", str(ROOT / "configs/encoder/tiny.yaml"), "--data.root", str(setup["pairs"]),
                "--data.batch_size", "8", "--data.val_fraction", "0.25", "--model.encoder", str(TINY_ENCODER),
                "--trainer.logger.init_args.save_dir", str(out / "logs"), "--trainer.default_root_dir", str(out),
                "--checkpoint.dirpath", str(out / "ckpt"), "--export.path", str(out / "encoder.safetensors"), *extra]
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            main(args)
        assert exc.value.code == 1, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert err and err[-1].startswith("error: "), (extra, err)
        assert not any("Traceback" in line for line in err), (extra, err)
        assert_one_clean_line(err[-1], word)
        assert not out.exists(), (extra, sorted(p.name for p in out.rglob("*")))
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------------------------------
# Resume (point 12).

class _Kill(__import__("pytorch_lightning").Callback):
    """Stops the run at the start of an epoch, as a kill right after the previous epoch's checkpoint would."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise KeyboardInterrupt


def test_resume_after_an_epoch_is_bit_exact(setup, tmp_path):
    """Killed after epoch 1 and resumed = uninterrupted, bit for bit: data order, dropout, input noise and EMA."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint

    from datasets.pairs import PairDataModule
    from training.encoder_module import EncoderModule

    def fit(d: Path, ckpt_path=None, kill=None):
        pl.seed_everything(0)
        callbacks = [ModelCheckpoint(dirpath=d, save_last=True)] + ([_Kill(kill)] if kill is not None else [])
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=3, logger=False, callbacks=callbacks,
                             limit_val_batches=1, enable_progress_bar=False, enable_model_summary=False)
        module = EncoderModule(pairs_root=str(setup["pairs"]), encoder=dict(TINY_ENCODER, dropout=0.2), lr=1e-3,
                               ema_decay=0.9, input_noise=0.1, warmup_steps=2)
        dm = PairDataModule(str(setup["pairs"]), batch_size=8, val_fraction=0.25)
        try:
            trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        except (KeyboardInterrupt, SystemExit):  # Lightning turns the interrupt into an exit in some versions
            pass
        return trainer, module

    t_full, m_full = fit(tmp_path / "full")
    t_cut, _ = fit(tmp_path / "cut", kill=1)
    assert t_cut.global_step == 4  # 36 training pairs / 8, drop_last
    t_res, m_res = fit(tmp_path / "cut", ckpt_path=str(tmp_path / "cut" / "last.ckpt"))
    assert t_full.global_step == t_res.global_step == 12
    full, res = m_full.state_dict(), m_res.state_dict()
    assert full.keys() == res.keys()
    differ = [k for k in full if not torch.equal(full[k], res[k])]
    assert not differ, differ[:5]
    assert any(k.startswith("encoder_ema.") for k in full)


def test_training_order_depends_only_on_seed_and_epoch(setup):
    from datasets.pairs import EpochShuffleSampler

    a, b = EpochShuffleSampler(20, seed=3), EpochShuffleSampler(20, seed=3)
    torch.rand(5)  # the global RNG plays no part
    b.set_epoch(1)
    first = list(a)
    assert sorted(first) == list(range(20)) and list(a) == first
    a.set_epoch(1)
    assert list(a) == list(b) != first
    assert list(EpochShuffleSampler(20, seed=4)) != first
