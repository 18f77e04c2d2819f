"""Inference precision: one setting (``32``, ``bf16``, ``16``) for the generator, the encoder and the part swap.

    from keepr.precision import check_precision, autocast
    precision = check_precision(settings.precision, device)     # canonical name; one-line KeeprError if impossible
    with torch.inference_mode(), autocast(device, precision):
        img = G(z)                                               # outputs stay fp32 (see each model's notes)

- ``32`` (default): plain fp32, exact (parity with the reference implementations).
- ``bf16``: autocast to bfloat16. On CPU it pays only with native bf16 dot products (AVX-512 BF16 or AMX, e.g. AMD
  Zen 4/5, Intel Cooper Lake / Sapphire Rapids and later); elsewhere it is allowed but warns (slower than fp32). On
  CUDA it needs compute capability >= 8.0 (Ampere).
- ``16``: autocast to float16; CUDA only (fp16 on CPU is emulated and slow, so it is refused).

Lightning's names are accepted as well: ``32-true``, ``bf16-mixed``, ``16-mixed`` (and ``fp32``, ``fp16``...).
``channels_last`` helpers put a module / tensor in NHWC, the layout oneDNN and cuDNN run fastest (with bf16 on CPU
it is what makes the convolutions pay). ``tune_allocator`` stops glibc from mapping and unmapping every large tensor.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import sys
import warnings

import torch

from keepr.errors import KeeprError

PRECISIONS = ("32", "bf16", "16")
_ALIASES = {
    "32": "32", "32-true": "32", "fp32": "32", "float32": "32", "float": "32", "full": "32",
    "bf16": "bf16", "bf16-mixed": "bf16", "bfloat16": "bf16",
    "16": "16", "16-mixed": "16", "fp16": "16", "float16": "16", "half": "16",
}
_DTYPES = {"32": torch.float32, "bf16": torch.bfloat16, "16": torch.float16}


class SlowPrecisionWarning(UserWarning):
    """The device can run the precision, but emulated: slower than fp32."""


def parse_precision(value) -> str:
    """``32`` / ``bf16`` / ``16`` (or a Lightning / dtype alias, an int 32 / 16) -> canonical name; KeeprError else."""
    key = str(value).strip().lower() if value is not None else "32"
    if key not in _ALIASES:
        raise KeeprError(f"precision must be one of 32, bf16, 16 (or 32-true, bf16-mixed, 16-mixed), got {value!r}")
    return _ALIASES[key]


def compute_dtype(precision) -> torch.dtype:
    """The dtype the convolutions run in at this precision."""
    return _DTYPES[parse_precision(precision)]


@functools.lru_cache(maxsize=1)
def cpu_bf16_native() -> str | None:
    """The CPU feature that gives native bf16 dot products ('amx_bf16' or 'avx512_bf16'), None without one.

    Read from /proc/cpuinfo flags (Linux); elsewhere from torch's oneDNN ISA query when it exists, else None."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags.update(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    for flag in ("amx_bf16", "avx512_bf16"):
        if flag in flags:
            return flag
    if not flags:  # not Linux: ask oneDNN (torch >= 2.1 on x86)
        try:
            if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
                return "onednn_bf16"
        except (AttributeError, RuntimeError):
            pass
    return None


def check_precision(precision, device="cpu", warn: bool = True) -> str:
    """Canonical precision after checking that ``device`` can run it: a one-line KeeprError when it cannot
    (``16`` on CPU; ``bf16`` / ``16`` on a GPU without them); ``bf16`` on a CPU without native bf16 warns
    (SlowPrecisionWarning) and is allowed."""
    p = parse_precision(precision)
    dev = torch.device(device)
    if p == "32":
        return p
    if dev.type == "cpu":
        if p == "16":
            raise KeeprError("precision 16 is for GPUs: on CPU float16 is emulated and slower than fp32; "
                             "use bf16 (CPUs with AVX-512 BF16 or AMX) or 32")
        if cpu_bf16_native() is None and warn:
            warnings.warn("precision bf16 on a CPU without AVX-512 BF16 or AMX: bf16 is emulated there and slower "
                          "than fp32 (use 32 on this machine)", SlowPrecisionWarning, stacklevel=2)
        return p
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise KeeprError(f"device {dev} is not available (no CUDA GPU visible to torch)")
        if p == "bf16" and not torch.cuda.is_bf16_supported():
            name = torch.cuda.get_device_name(dev)
            raise KeeprError(f"precision bf16 needs a GPU with compute capability >= 8.0, {name} has not; use 16 or 32")
        return p
    if dev.type == "mps" and p == "bf16" and not _mps_bf16():
        raise KeeprError("precision bf16 is not supported on this MPS device; use 16 or 32")
    return p


def _mps_bf16() -> bool:
    try:
        torch.zeros(1, dtype=torch.bfloat16, device="mps")
        return True
    except (RuntimeError, TypeError):
        return False


def autocast(device, precision):
    """Context manager: autocast to the precision's dtype on ``device`` (a no-op context for ``32``).

    The models arrange their own hot paths under it (StyleGAN2 synthesis runs in the dtype with fp32 styles and RGB;
    the co-part reconstruction module runs folded in the dtype; segmentation and warps stay fp32)."""
    p = parse_precision(precision)
    if p == "32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=_DTYPES[p])


def active_dtype(device_type: str) -> torch.dtype:
    """The dtype autocast gives convolutions on ``device_type`` right now (fp32 when autocast is off)."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.float32


def channels_last(module: torch.nn.Module) -> torch.nn.Module:
    """Put the 4-D parameters and buffers of ``module`` in channels_last (NHWC) memory order, in place."""
    return module.to(memory_format=torch.channels_last)


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """A 4-D tensor in channels_last order (unchanged if it already is or is not 4-D)."""
    if x.ndim == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def use_channels_last(device, precision) -> bool:
    """Whether channels_last helps on this device at this precision: always with oneDNN (CPU) and on CUDA with
    reduced precision (tensor cores read NHWC); the models' fp32 CPU paths use it too."""
    dev = torch.device(device)
    return dev.type == "cpu" or parse_precision(precision) != "32"


# ------------------------------------------------------------------------------------------------------------------
# Allocator.

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
_tuned: dict | None = None


def tune_allocator(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> dict:
    """Keep glibc malloc from mapping fresh pages for every large tensor and unmapping them on free.

    Batches of 256 px frames allocate tensors of 1-130 MB; by default glibc serves each with mmap and returns it with
    munmap, so every batch page-faults its memory back in (millions of minor faults per video). This raises the mmap
    threshold to its maximum (32 MiB: smaller tensors come from the heap and are reused) and the trim threshold, once
    per process. Memory stays flat in video length (the heap is reused, not grown). Call it from an entry point
    before the work starts; a no-op (returns {'applied': False}) off glibc or when the user set MALLOC_* variables.
    """
    global _tuned
    if _tuned is not None:
        return _tuned
    result = {"applied": False, "mmap_threshold": None, "trim_threshold": None}
    if not sys.platform.startswith("linux") or any(k.startswith("MALLOC_") for k in os.environ) \
            or "jemalloc" in os.environ.get("LD_PRELOAD", "") or "tcmalloc" in os.environ.get("LD_PRELOAD", ""):
        _tuned = result
        return result
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        _tuned = result
        return result
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok1 = mallopt(M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
    ok2 = mallopt(M_TRIM_THRESHOLD, int(trim_threshold)) == 1
    result = {"applied": ok1 or ok2, "mmap_threshold": mmap_threshold if ok1 else None,
              "trim_threshold": trim_threshold if ok2 else None}
    _tuned = result
    return result
