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
    """The demo's tiny architectures, built once per session by ``models.tiny.make_tiny_models``: random-init
    generator and co-part model and an untrained tiny encoder (the machinery, not the look), plus an infer config
    pointing at them. Keys: the infer model paths (``generator``, ``encoder``, ``cosegmentation``,
    ``cosegmentation_config``), ``config`` (that infer YAML) and ``dir``."""
    from models.tiny import make_tiny_models  # builds torch models: only for the tests that use them

    d = tmp_path_factory.mktemp("tiny_models")
    return {**make_tiny_models(d), "dir": d}
