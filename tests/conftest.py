"""Shared pytest fixtures: where the bundled test data lives."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
MEDIA = FIXTURES / "media"

# wandb must never try the network in tests.
os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def media_dir() -> Path:
    return MEDIA


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict:
    """The demo's tiny architectures, built once per session: random-init generator and co-part model and an
    untrained tiny encoder (the machinery, not the look), plus an infer config pointing at them."""
    import torch
    import yaml

    from models.cosegmentation import make_tiny_cosegmentation
    from models.encoder import Encoder, save_encoder
    from models.stylegan2 import make_tiny_generator

    d = tmp_path_factory.mktemp("tiny_models")
    G = make_tiny_generator(seed=0)
    G.save(d / "generator_tiny.safetensors")
    make_tiny_cosegmentation(config=str(ROOT / "configs" / "cosegmentation" / "tiny.yaml"), seed=0).save(
        d / "cosegmentation_tiny.pth.tar")
    cfg = yaml.safe_load((ROOT / "configs" / "encoder" / "tiny.yaml").read_text())["model"]["encoder"]
    torch.manual_seed(0)
    enc = Encoder(w_dim=G.w_dim, num_ws=G.num_ws, img_resolution=G.img_resolution, **cfg)
    save_encoder(enc, d / "encoder.safetensors", d / "generator_tiny.safetensors")
    config = d / "infer.yaml"
    config.write_text(
        (ROOT / "configs" / "infer" / "tiny.yaml").read_text()
        .replace("outputs/tiny/generator_tiny.safetensors", str(d / "generator_tiny.safetensors"))
        .replace("outputs/encoder_tiny_demo/encoder.safetensors", str(d / "encoder.safetensors"))
        .replace("outputs/tiny/cosegmentation_tiny.pth.tar", str(d / "cosegmentation_tiny.pth.tar")))
    return {"dir": d, "config": config}
