"""Read NVlabs network pickles (``ffhq.pkl``, ``network-snapshot-*.pkl``) without executing anything in them.

An official pickle stores each network as a call of ``torch_utils.persistence._reconstruct_persistent_obj(meta)``,
where ``meta`` carries the Python source of the defining module (``module_src``) and the object's ``__dict__``
(``state``). The official loader executes ``module_src``; a pickle is untrusted input, so we never do. Our unpickler
maps an allow-list of globals to harmless local callables: a persistent object becomes a ``PersistentRecord`` (class
name + state, nothing else), tensors are rebuilt by torch's own tensor rebuild functions (storages through
``torch.load(weights_only=True)``), and every other global is refused with a ``KeeprError`` before it is called.
"""
from __future__ import annotations

import collections
import io
import pickle
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch._tensor as tt
import torch._utils as tu

from keepr.errors import KeeprError
from keepr.weights import read_error_cause

TF_PICKLE_MESSAGE = "TensorFlow pickle: convert it first (stylegan2-ada-pytorch legacy.py) or use a PyTorch snapshot"


class PersistentRecord:
    """What an NVlabs persistent object (a network or sub-module) becomes: its class name and saved state."""

    __slots__ = ("class_name", "version", "state")

    def __init__(self, class_name: str, version: Any, state: Any):
        self.class_name = class_name
        self.version = version
        self.state = state

    def __repr__(self) -> str:
        return f"PersistentRecord({self.class_name!r})"


class EasyDict(dict):
    """Stand-in for ``dnnlib.util.EasyDict``: a dict whose items are also attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value


def _reconstruct_persistent_obj(meta):
    # The only thing taken from `meta` is data; `module_src` is dropped unread.
    if not isinstance(meta, dict) or meta.get("type") != "class":
        raise pickle.UnpicklingError("unexpected persistent object metadata")
    return PersistentRecord(str(meta.get("class_name")), meta.get("version"), meta.get("state"))


def _load_from_bytes(blob: bytes):
    # A legacy torch.save() of one storage; the restricted torch loader rebuilds it without running code.
    if not isinstance(blob, (bytes, bytearray)):
        raise pickle.UnpicklingError("tensor storage is not a byte string")
    return torch.load(io.BytesIO(blob), weights_only=True, map_location="cpu")


def _codecs_encode(text, encoding="utf-8", errors="strict"):
    # Protocol-2 pickles spell byte strings as _codecs.encode(str, 'latin1').
    if encoding not in ("latin1", "latin-1", "utf-8", "utf8") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode(encoding, errors)


def _numpy_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise pickle.UnpicklingError("refusing numpy object scalar")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _allowed_globals() -> dict[tuple[str, str], Callable]:
    allowed: dict[tuple[str, str], Callable] = {
        ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
        ("dnnlib.util", "EasyDict"): EasyDict,
        ("dnnlib", "EasyDict"): EasyDict,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): tu._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor"): tu._rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): tu._rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): tu._rebuild_parameter_with_state,
        ("torch.storage", "_load_from_bytes"): _load_from_bytes,
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
        ("torch", "Tensor"): torch.Tensor,
        ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
        ("numpy", "dtype"): np.dtype,
        ("numpy.core.multiarray", "scalar"): _numpy_scalar,
        ("numpy._core.multiarray", "scalar"): _numpy_scalar,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("__builtin__", "set"): set,
        ("__builtin__", "frozenset"): frozenset,
        ("_codecs", "encode"): _codecs_encode,
    }
    for name in ("float32", "float16", "float64", "bfloat16", "int64", "int32", "uint8", "bool"):
        allowed[("torch", name)] = getattr(torch, name)
    for name in ("FloatStorage", "HalfStorage", "DoubleStorage", "LongStorage", "IntStorage", "ByteStorage",
                 "BoolStorage", "BFloat16Storage"):
        if hasattr(torch, name):
            allowed[("torch", name)] = getattr(torch, name)
    return allowed


def _rebuild_from_type_v2(func, new_type, args, state):
    # torch._tensor._rebuild_from_type_v2 with the callables already vetted by find_class; only plain tensor types.
    if new_type not in (torch.Tensor, torch.nn.Parameter):
        raise pickle.UnpicklingError(f"refusing tensor subclass {new_type!r}")
    return tt._rebuild_from_type_v2(func, new_type, args, state)


class SafeNetworkUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose globals come only from an allow-list; anything else raises ``KeeprError``."""

    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source
        self.allowed = _allowed_globals()
        self.allowed[("torch._tensor", "_rebuild_from_type_v2")] = _rebuild_from_type_v2

    def find_class(self, module: str, name: str):
        fn = self.allowed.get((module, name))
        if fn is not None:
            return fn
        if module.startswith("dnnlib.tflib"):
            raise KeeprError(f"{self.source}: {TF_PICKLE_MESSAGE}")
        raise KeeprError(f"{self.source}: refusing to load global '{module}.{name}' from the pickle: it is not part "
                         f"of a StyleGAN2 network pickle, and KEEP:R never executes code from weight files")

    def persistent_load(self, pid):
        raise KeeprError(f"{self.source}: unsupported pickle (persistent id {str(pid)[:40]!r}); "
                         f"is it a torch.save file?")


def safe_load_network_pickle(path: str | Path) -> Any:
    """Unpickle an NVlabs network pickle with the allow-list unpickler; networks come back as PersistentRecords."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return SafeNetworkUnpickler(f, str(path)).load()
    except KeeprError:
        raise
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            RuntimeError, MemoryError, OverflowError, UnicodeDecodeError) as exc:
        raise KeeprError(f"{path}: cannot read the network pickle: {read_error_cause(exc)}.") from None


def flatten_record(record: PersistentRecord, source: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """A module record -> its ``state_dict()``: parameters, then persistent buffers, then children, dotted names."""
    state = record.state
    if not isinstance(state, dict):
        raise KeeprError(f"{source}: network object {record.class_name!r} has no module state")
    out: dict[str, torch.Tensor] = {}
    non_persistent = state.get("_non_persistent_buffers_set") or set()
    for group in ("_parameters", "_buffers"):
        for key, value in (state.get(group) or {}).items():
            if value is None or (group == "_buffers" and key in non_persistent):
                continue
            if not isinstance(value, torch.Tensor):
                raise KeeprError(f"{source}: {prefix}{key} is not a tensor ({type(value).__name__})")
            out[prefix + key] = value.detach()
    for key, child in (state.get("_modules") or {}).items():
        if child is None:
            continue
        if not isinstance(child, PersistentRecord):
            raise KeeprError(f"{source}: sub-module {prefix}{key} has unsupported type {type(child).__name__}")
        out.update(flatten_record(child, source, prefix + key + "."))
    return out
