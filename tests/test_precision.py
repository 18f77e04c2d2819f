"""Inference precision (keepr.precision): names and device checks, bf16 accuracy bounds of the generator and the
part swap against fp32 on the parity fixtures, fp32 unchanged, co-part models built under inference_mode, the GPU
check script (skips cleanly without a GPU; its CUDA parity tests run here when a GPU is present)."""
from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import keepr.precision as kp
from keepr.errors import KeeprError
from keepr.precision import autocast, check_precision, compute_dtype, parse_precision
from models.cosegmentation import CoPartModel, PartSwapper, load_cosegmentation, make_tiny_cosegmentation
from models.cosegmentation.loader import load_config
from models.stylegan2 import load_generator

ROOT = Path(__file__).resolve().parents[1]
# Stated bounds (README "Precision"): bf16 against fp32 on the parity fixtures.
# StyleGAN2 fixture P (32 px, outputs in [-6.7, 5.4], far outside [-1, 1]); measured 47.5 dB, 4.7%, 0.066.
GEN_BF16_PSNR = 40.0          # dB, uint8 images
GEN_BF16_OFF2 = 0.10          # fraction of uint8 values off by > 2 levels
GEN_BF16_MAX = 0.15           # max abs error on the [-1, 1] scale
# Part swap, parity fixture (128 px trained-format checkpoint): measured PSNR 41.0 dB, max 0.087, 42% of values off by
# > 1 level, 21% by > 2 -- much worse than full-size vox-10 random weights (58.8 dB, none off by > 1; see
# bench/official_cosegmentation.py). The bounds below hold today's fixture figures; the 99.9%-within-1-level
# target is met on vox-10 random weights only (README "Precision").
SWAP_BF16_PSNR = 38.0         # dB, uint8 frames
SWAP_BF16_MAX = 0.15          # max abs error on [0,1] floats
SWAP_BF16_OFF2 = 0.30         # fraction of uint8 values off by > 2 levels
CUDA_FP32_TOL = 1e-4          # CPU fp32 vs CUDA fp32 (TF32 off), max abs, both networks
CUDA_LOW_PSNR = 40.0          # CUDA 16 / bf16 vs CPU fp32, dB


def _u8(x):
    return (x.clamp(0, 1) * 255).round()


def _psnr(a, b):
    mse = ((a - b) ** 2).mean().item()
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


# ------------------------------------------------------------------------------------------------------------------
# Names and device checks.

@pytest.mark.parametrize("name,want", [("32", "32"), (32, "32"), ("32-true", "32"), ("fp32", "32"), (None, "32"),
                                       ("bf16", "bf16"), ("bf16-mixed", "bf16"), ("BF16", "bf16"),
                                       ("16", "16"), (16, "16"), ("16-mixed", "16"), ("fp16", "16")])
def test_parse_precision(name, want):
    assert parse_precision(name) == want


def test_bad_precision_one_line():
    with pytest.raises(KeeprError) as e:
        parse_precision("64")
    assert "\n" not in str(e.value) and "bf16" in str(e.value)


def test_device_checks(monkeypatch):
    assert compute_dtype("bf16-mixed") == torch.bfloat16 and compute_dtype("32") == torch.float32
    with pytest.raises(KeeprError, match="16 is for GPUs"):
        check_precision("16", "cpu")
    monkeypatch.setattr(kp, "cpu_bf16_native", lambda: None)
    with pytest.warns(kp.SlowPrecisionWarning, match="AVX-512 BF16 or AMX"):
        assert check_precision("bf16", "cpu") == "bf16"
    monkeypatch.setattr(kp, "cpu_bf16_native", lambda: "avx512_bf16")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_precision("bf16-mixed", "cpu") == "bf16"
    if not torch.cuda.is_available():
        with pytest.raises(KeeprError, match="not available"):
            check_precision("16", "cuda")


def test_cpu_flag_detection_agrees_with_cpuinfo():
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    native = kp.cpu_bf16_native()
    if " avx512_bf16" in flags or " amx_bf16" in flags:
        assert native in ("avx512_bf16", "amx_bf16")
    elif flags:
        assert native is None


def test_autocast_contexts():
    with autocast("cpu", "32"):
        assert not torch.is_autocast_enabled("cpu")
    with autocast("cpu", "bf16"):
        assert torch.is_autocast_enabled("cpu") and kp.active_dtype("cpu") == torch.bfloat16
    assert kp.active_dtype("cpu") == torch.float32


def test_tune_allocator_in_subprocess():
    code = "import json, keepr.precision as p; print(json.dumps(p.tune_allocator()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    res = json.loads(out.stdout)
    assert set(res) == {"applied", "mmap_threshold", "trim_threshold"}
    if sys.platform.startswith("linux"):
        assert res["applied"] is True


# ------------------------------------------------------------------------------------------------------------------
# Generator.

@pytest.fixture(scope="module")
def gen_fixture(fixtures_dir):
    pdir = fixtures_dir / "stylegan2" / "P"
    return load_generator(pdir / "network.pkl"), load_file(str(pdir / "io.safetensors"))


def test_generator_bf16_accuracy(gen_fixture):
    G, io = gen_fixture
    with torch.inference_mode():
        ref = G.synthesis(io["ws_psi0p7"], noise_mode="const")
        with autocast("cpu", "32"):
            same = G.synthesis(io["ws_psi0p7"], noise_mode="const")
        with autocast("cpu", "bf16"):
            low = G.synthesis(io["ws_psi0p7"], noise_mode="const")
            ws_low = G.mapping(io["z"], None, truncation_psi=0.7)
    assert torch.equal(ref, same)  # 32: bit-identical
    assert low.dtype == torch.float32 and ws_low.dtype == torch.float32
    assert torch.equal(ws_low, G.mapping(io["z"], None, truncation_psi=0.7))  # mapping stays fp32
    a, b = _u8((ref + 1) / 2), _u8((low + 1) / 2)
    assert (low - ref).abs().max().item() <= GEN_BF16_MAX
    assert _psnr(a, b) >= GEN_BF16_PSNR
    assert ((a - b).abs() > 2).float().mean().item() <= GEN_BF16_OFF2


def test_generator_official_paths_under_autocast(gen_fixture):
    """The official fused / unfused paths keep plain autocast semantics (and still run)."""
    G, io = gen_fixture
    with torch.inference_mode(), autocast("cpu", "bf16"):
        for fused in (True, False):
            out = G.synthesis(io["ws_psi1"], noise_mode="const", fused_modconv=fused)
            assert torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------------------------------
# Part swap.

@pytest.fixture(scope="module")
def coseg(fixtures_dir):
    fx = fixtures_dir / "cosegmentation" / "public"
    src = torch.from_numpy(np.load(fx / "source.npy")).permute(2, 0, 1)[None]
    drv = torch.from_numpy(np.load(fx / "driving.npy")).permute(0, 3, 1, 2)
    return load_cosegmentation(fx / "checkpoint_logger.pth.tar", fx / "config.yaml"), src, drv, fx


def test_part_swap_bf16_accuracy(coseg):
    model, src, drv, _ = coseg
    with torch.inference_mode():
        ref = PartSwapper(model, src, [1, 2, 5], precision="32")(drv)
        sw = PartSwapper(model, src, [1, 2, 5], precision="bf16-mixed")
        assert sw.cache.features.dtype == torch.bfloat16  # the source cache lives in the compute dtype
        low = sw(drv)
        with autocast("cpu", "bf16"):  # the caller's autocast works the same way
            low2 = PartSwapper(model, src, [1, 2, 5])(drv)
    assert low.dtype == torch.float32
    assert torch.equal(low, low2)
    assert (low - ref).abs().max().item() <= SWAP_BF16_MAX
    assert _psnr(_u8(low), _u8(ref)) >= SWAP_BF16_PSNR
    assert ((_u8(low) - _u8(ref)).abs() > 2).float().mean().item() <= SWAP_BF16_OFF2


def test_part_swap_fp32_layouts_agree(coseg):
    """channels_last (CPU default) and NCHW give the same frames within fp32 rounding."""
    model, src, drv, _ = coseg
    with torch.inference_mode():
        a = model.part_swap(src, drv, [1, 2, 5])
        model.channels_last = False
        try:
            b = model.part_swap(src, drv, [1, 2, 5])
        finally:
            model.channels_last = None
    assert (a - b).abs().max().item() <= 1e-5


def test_copart_built_in_inference_mode(coseg):
    _, src, drv, fx = coseg
    mp, size = load_config(fx / "config.yaml")
    with torch.inference_mode():
        ref = load_cosegmentation(fx / "checkpoint_logger.pth.tar", fx / "config.yaml").part_swap(src, drv, [1, 2])
        m = CoPartModel(mp, img_size=size)
        m.load_state_dict(load_cosegmentation(fx / "checkpoint_logger.pth.tar", fx / "config.yaml").state_dict())
        out = PartSwapper(m, src, [1, 2], batch_size=2)(drv)
        assert (out - ref).abs().max().item() <= 1e-5
        # New weights (load_state_dict copies in place; inference tensors have no version counter) are used.
        tiny = make_tiny_cosegmentation(fx / "config.yaml", seed=3)
        m.load_state_dict(tiny.state_dict())
        out2 = PartSwapper(m, src, [1, 2], batch_size=2)(drv)
        assert (out2 - tiny.part_swap(src, drv, [1, 2], batch_size=2)).abs().max().item() <= 1e-5
        assert (out2 - out).abs().max().item() > 1e-3
        low = PartSwapper(m, src, [1, 2], precision="bf16")(drv)
        assert torch.isfinite(low).all()


# ------------------------------------------------------------------------------------------------------------------
# GPU check script.

def test_gpu_check_script_skips_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: bench/gpu_check.sh runs for real (minutes)")
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), sys.executable], capture_output=True,
                       text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "skipped" in r.stdout and "no CUDA GPU" in r.stdout


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu_check.sh)")


@needs_cuda
def test_cuda_generator_parity(gen_fixture):
    G, io = gen_fixture
    Gc = load_generator(ROOT / "tests" / "fixtures" / "stylegan2" / "P" / "network.pkl", device="cuda")
    ws = io["ws_psi0p7"]
    with torch.inference_mode(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        torch.backends.cuda.matmul.allow_tf32 = False
        ref = G.synthesis(ws, noise_mode="const")
        out = Gc.synthesis(ws.cuda(), noise_mode="const").cpu()
        assert (out - ref).abs().max().item() <= CUDA_FP32_TOL
        for prec in ("16", "bf16"):
            if prec == "bf16" and not torch.cuda.is_bf16_supported():
                continue
            with autocast("cuda", prec):
                low = Gc.synthesis(ws.cuda(), noise_mode="const").float().cpu()
            assert _psnr(_u8((ref + 1) / 2), _u8((low + 1) / 2)) >= CUDA_LOW_PSNR, prec


@needs_cuda
def test_cuda_part_swap_parity(coseg):
    model, src, drv, fx = coseg
    mc = load_cosegmentation(fx / "checkpoint_logger.pth.tar", fx / "config.yaml", device="cuda")
    with torch.inference_mode():
        ref = model.part_swap(src, drv, [1, 2, 5])
        out = mc.part_swap(src.cuda(), drv.cuda(), [1, 2, 5]).cpu()
        assert (out - ref).abs().max().item() <= CUDA_FP32_TOL
        for prec in ("16", "bf16"):
            if prec == "bf16" and not torch.cuda.is_bf16_supported():
                continue
            low = mc.part_swap(src.cuda(), drv.cuda(), [1, 2, 5], precision=prec).cpu()
            assert _psnr(_u8(low), _u8(ref)) >= SWAP_BF16_PSNR, prec
