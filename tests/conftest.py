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
