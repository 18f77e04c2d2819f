"""Reading third-party weight files safely (never executing a pickle).

Errors name the file and say why it cannot be read in one complete sentence. torch's own text is never passed on: it
runs over several lines and advises turning ``weights_only`` off, which would let the file run code.
"""
from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, Iterable

import torch

from keepr.errors import KeeprError

_GLOBAL = re.compile(r"GLOBAL ([A-Za-z_][\w.]*)")


def read_error_cause(exc: BaseException) -> str:
    """Why reading a weight file failed, as a short clause (no trailing period) for a one-line message.

    Covers ``torch.load(weights_only=True)`` refusals, truncated zip / legacy torch files and damaged pickles.
    """
    text = " ".join(str(exc).split())
    if isinstance(exc, KeeprError):
        return text
    if "Weights only load failed" in text or "WeightsUnpickler" in text:
        found = _GLOBAL.search(text)
        if found:
            return (f"it holds a Python object ({found.group(1)}) besides tensors, and KEEP:R never unpickles "
                    f"objects from weight files because that can run code")
        return ("it holds pickled Python objects besides tensors, and KEEP:R never unpickles objects from weight "
                "files because that can run code")
    if isinstance(exc, EOFError) or "Ran out of input" in text or "truncated" in text.lower():
        return "the file is truncated or corrupt (it ends early)"
    if isinstance(exc, zipfile.BadZipFile) or "zip archive" in text or "PytorchStreamReader" in text:
        return "the file is truncated or corrupt (its zip archive cannot be read)"
    if isinstance(exc, MemoryError):
        return "the file is corrupt (it asks for more memory than there is)"
    if isinstance(exc, (PermissionError, IsADirectoryError, FileNotFoundError)):
        return f"it cannot be opened ({exc.strerror or type(exc).__name__})"
    if isinstance(exc, OSError):  # torch's zip reader reports a truncated archive as e.g. EINVAL
        return f"the file is truncated or corrupt ({exc.strerror or type(exc).__name__})"
    if isinstance(exc, pickle.UnpicklingError):
        return "the file is truncated or corrupt (invalid pickle data)"
    return f"the file is truncated or corrupt, or not in this format ({type(exc).__name__})"


def torch_load_weights(path: str | Path, what: str, safe_globals: Iterable[Any] = ()) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; any failure is a one-line KeeprError naming ``what``.

    ``safe_globals`` allow-lists extra plain-data classes (e.g. ``argparse.Namespace`` in rosinality snapshots).
    """
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(list(safe_globals)):
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for damaged or hostile files
        raise KeeprError(f"{path}: cannot read the {what}: {read_error_cause(exc)}.") from None


def read_state_dict(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """Tensor state dict from a ``.safetensors`` file or a torch file read with ``weights_only=True``.

    A checkpoint that wraps its weights as ``{"state_dict": {...}}`` is unwrapped. ``what`` names the weights in errors.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # heavy (safetensors): only in read_state_dict()

        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise KeeprError(f"{path}: cannot read the {what} weights: the safetensors file is truncated or corrupt "
                             f"({' '.join(str(exc).split())}).") from None
    state = torch_load_weights(path, f"{what} weights")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise KeeprError(f"{path}: the {what} file does not hold a state_dict (it holds a {type(state).__name__}).")
    return state
