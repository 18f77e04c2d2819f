"""Reading third-party weight files safely (never executing a pickle)."""
from __future__ import annotations

from pathlib import Path

import torch

from keepr.errors import KeeprError


def read_state_dict(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """Tensor state dict from a ``.safetensors`` file or a torch file read with ``weights_only=True``.

    A checkpoint that wraps its weights as ``{"state_dict": {...}}`` is unwrapped. ``what`` names the weights in errors.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise KeeprError(f"{path}: cannot read {what} weights ({type(exc).__name__}: {exc})") from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise KeeprError(f"{path}: cannot read {what} weights as a tensor state_dict ({type(exc).__name__})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise KeeprError(f"{path}: {what} file does not hold a state_dict")
    return state
