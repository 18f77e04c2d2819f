"""Configs and checkpoints of Motion-Supervised Co-Part Segmentation.

Configs are the authors' YAML files (``model_params`` + ``dataset_params.image_shape``). Checkpoints come in two
layouts:
- logger layout (the authors' training logger): ``segmentation_module``, ``reconstruction_module`` (+ optimizers,
epoch);
- first-order-model layout: ``generator`` (= reconstruction module) and ``kp_detector`` (= segmentation module with
  ``kp.* -> shift.*``, ``jacobian.* -> affine.*``, ``semantic_seg.* -> segmentation.*``).
Both legacy (torch < 1.6) and zip serialisation are read with ``torch.load(weights_only=True)``; no pickle is executed.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import yaml

from keepr.errors import KeeprError
from keepr.registry import missing
from keepr.weights import torch_load_weights

from .part_swap import CoPartModel

FOMM_RENAMES = {"kp.": "shift.", "jacobian.": "affine.", "semantic_seg.": "segmentation."}
REPO_ROOT = Path(__file__).resolve().parents[2]


def load_config(config) -> tuple[dict, int]:
    """Read an official-structure YAML config (path or dict) -> (model_params, img_size)."""
    if isinstance(config, dict):
        cfg, name = config, "<dict>"
    else:
        name = str(config)
        if not os.path.isfile(name) and not os.path.isabs(name) and (REPO_ROOT / name).is_file():
            name = str(REPO_ROOT / name)  # Repository-relative paths work from any working directory.
        if not os.path.isfile(name):
            raise KeeprError(f"{name}: co-part segmentation config not found")
        try:
            with open(name) as f:
                cfg = yaml.safe_load(f)
        except yaml.YAMLError as exc:
            raise KeeprError(f"{name}: not a valid YAML file ({type(exc).__name__})") from None
    try:
        mp = cfg["model_params"]
        for key in ("common_params", "segmentation_module_params", "reconstruction_module_params"):
            if not isinstance(mp[key], dict):
                raise KeyError(key)
        int(mp["common_params"]["num_segments"])
    except (KeyError, TypeError, ValueError) as exc:
        raise KeeprError(f"{name}: not a co-part segmentation config (model_params.{exc} missing)") from None
    shape = (cfg.get("dataset_params") or {}).get("image_shape") or [256, 256, 3]
    return mp, int(shape[0])


def build_model(config) -> CoPartModel:
    """An eval-mode model with the official architecture of ``config`` and its default (untrained) init."""
    mp, img_size = load_config(config)
    try:
        return CoPartModel(mp, img_size=img_size)
    except TypeError as exc:
        raise KeeprError(f"{config if not isinstance(config, dict) else '<dict>'}: bad model_params ({exc})") from None


def _read_checkpoint(path: str) -> dict:
    ckpt = torch_load_weights(path, "co-part segmentation checkpoint")
    if not isinstance(ckpt, dict):
        raise KeeprError(f"{path}: expected a dict checkpoint, got {type(ckpt).__name__}")
    return ckpt


def checkpoint_state_dict(ckpt: dict, path: str = "<checkpoint>") -> dict:
    """Flatten either layout to model keys (``segmentation_module.*``, ``reconstruction_module.*``)."""
    if "segmentation_module" in ckpt and "reconstruction_module" in ckpt:
        parts = {"segmentation_module": ckpt["segmentation_module"],
                 "reconstruction_module": ckpt["reconstruction_module"]}
    elif "generator" in ckpt and "kp_detector" in ckpt:
        seg = {}
        for key, value in dict(ckpt["kp_detector"]).items():
            for old, new in FOMM_RENAMES.items():
                if key.startswith(old):
                    key = new + key[len(old):]
                    break
            seg[key] = value
        parts = {"segmentation_module": seg, "reconstruction_module": ckpt["generator"]}
    else:
        raise KeeprError(f"{path}: unknown checkpoint layout (top-level keys {sorted(map(str, ckpt))}; expected "
                         "segmentation_module + reconstruction_module, or generator + kp_detector)")
    out = {}
    for prefix, sd in parts.items():
        if not isinstance(sd, dict):
            raise KeeprError(f"{path}: {prefix} is not a state dict")
        for key, value in sd.items():
            if isinstance(value, torch.Tensor):
                out[f"{prefix}.{key}"] = value
    return out


def load_state(model: CoPartModel, state: dict, path: str = "<checkpoint>") -> CoPartModel:
    """Copy ``state`` into ``model``: unknown keys are ignored, every parameter and buffer must be filled."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        shown = ", ".join(missing[:12]) + (f", ... ({len(missing)} in all)" if len(missing) > 12 else "")
        raise KeeprError(f"{path}: checkpoint does not match the config: missing {shown}")
    bad = [f"{k} {list(state[k].shape)} != {list(v.shape)}" for k, v in own.items() if state[k].shape != v.shape]
    if bad:
        shown = "; ".join(bad[:6]) + (f"; ... ({len(bad)} in all)" if len(bad) > 6 else "")
        raise KeeprError(f"{path}: checkpoint shapes do not match the config: {shown}")
    model.load_state_dict({k: state[k].to(v.dtype) for k, v in own.items()}, strict=True)
    return model.eval()


def load_cosegmentation(checkpoint, config, device: str | torch.device = "cpu") -> CoPartModel:
    """Build the model of ``config`` (official YAML) and fill it from ``checkpoint`` (either layout); eval mode."""
    path = str(checkpoint)
    if not os.path.isfile(path):
        raise missing("cosegmentation", path, f"co-part segmentation checkpoint for {Path(str(config)).name}")
    model = build_model(config)
    state = checkpoint_state_dict(_read_checkpoint(path), path)
    return load_state(model, state, path).to(device)


def init_random_(model: CoPartModel, seed: int = 0) -> CoPartModel:
    """Deterministic random weights (independent of torch's global RNG). Conv weights ~ N(0, 1/fan_in), biases and
    BatchNorm statistics small random; the affine head stays near identity so part motions are invertible."""
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                t.zero_()
                continue
            r = torch.randn(t.shape, generator=gen, dtype=torch.float32)
            if name.endswith("down.weight"):
                continue  # Fixed Gaussian kernel.
            if name.endswith("running_var"):
                t.copy_(1 + 0.5 * torch.rand(t.shape, generator=gen))
            elif name.endswith("running_mean") or name.endswith(".bias") and ".norm" in name:
                t.copy_(0.1 * r)
            elif ".norm" in name and name.endswith(".weight"):
                t.copy_(1 + 0.1 * r)
            elif name.endswith("affine.weight"):
                t.copy_(0.002 * r)
            elif name.endswith("affine.bias"):
                t.copy_(torch.tensor([1.0, 0.0, 0.0, 1.0]).repeat(t.numel() // 4) + 0.05 * r)
            elif t.ndim == 4:
                t.copy_(r / (t[0].numel() ** 0.5))
            else:
                t.copy_(0.05 * r)
    return model.eval()


DEFAULT_TINY_CONFIG = REPO_ROOT / "configs" / "cosegmentation" / "tiny.yaml"


def make_tiny_cosegmentation(config=None, seed: int = 0) -> CoPartModel:
    """A model of ``config`` (default configs/cosegmentation/tiny.yaml) with deterministic random weights, for tests
    and demos; ``.save(path)`` writes it in the logger layout."""
    return init_random_(build_model(config if config is not None else DEFAULT_TINY_CONFIG), seed)
