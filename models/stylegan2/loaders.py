"""Load a StyleGAN2 generator from any of its three checkpoint formats, build it from the file's own config.

- NVlabs network pickle (``ffhq.pkl``, ``network-snapshot-*.pkl``; stylegan2-ada-pytorch and stylegan3 layouts):
  read by the allow-list unpickler in ``safe_pickle`` (never executes the embedded source); uses ``G_ema``.
- rosinality checkpoint (``stylegan2-ffhq-config-f.pt``, ``{'g_ema', 'latent_avg'}``):
``torch.load(weights_only=True)``,
  tensors renamed to NVlabs names, config derived from the shapes.
- KEEP:R format: one ``.safetensors`` file with the NVlabs state dict, constructor kwargs as JSON in its metadata
  (``Generator.save``). A plain NVlabs-named ``.safetensors`` state dict with a sibling JSON holding ``init_kwargs``,
  or a rosinality-named one, is also accepted.

The format is recognised from the file's content, not its extension. Every failure is a ``KeeprError`` naming the file.
"""
from __future__ import annotations

import argparse
import json
import re
import struct
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import yaml
from safetensors import SafetensorError, safe_open

from keepr.errors import KeeprError
from keepr.registry import missing
from keepr.weights import torch_load_weights

from .networks import KEEPR_FORMAT, KEEPR_FORMAT_VERSION, Generator, _jsonable, setup_filter
from .safe_pickle import PersistentRecord, flatten_record, safe_load_network_pickle

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = ROOT / "configs" / "generator"


_MAPPING_KEYS = {"num_layers", "embed_features", "layer_features", "activation", "lr_multiplier", "w_avg_beta"}
_SYNTHESIS_KEYS = {"channel_base", "channel_max", "num_fp16_res", "conv_clamp", "architecture", "resample_filter",
                   "use_noise", "activation", "kernel_size"}
# Accepted and dropped: they only select fp16 memory layouts or when the official code fuses the modulated conv.
_SYNTHESIS_IGNORED = {"fp16_channels_last", "channels_last", "fused_modconv_default"}
_TOP_KEYS = {"z_dim", "c_dim", "w_dim", "img_resolution", "img_channels", "mapping_kwargs", "synthesis_kwargs"}


# ----------------------------------------------------------------------------------------------------------------
# Config handling.

def normalize_init_kwargs(kwargs: Mapping[str, Any], source: str = "config") -> dict:
    """NVlabs Generator kwargs in either repo layout -> the nested stylegan2-ada layout, checked, JSON-able.

    stylegan2-ada nests ``synthesis_kwargs``; stylegan3 puts them at the top level. Missing keys take the defaults.
    """
    kwargs = _jsonable(dict(kwargs))
    mapping = dict(kwargs.get("mapping_kwargs") or {})
    synthesis = dict(kwargs.get("synthesis_kwargs") or {})
    for key, value in kwargs.items():
        if key not in _TOP_KEYS:
            synthesis[key] = value  # stylegan3 layout
    for key in sorted(set(mapping) - _MAPPING_KEYS):
        raise KeeprError(f"{source}: unsupported mapping network option {key!r}={mapping[key]!r}")
    for key in sorted(set(synthesis) - _SYNTHESIS_KEYS - _SYNTHESIS_IGNORED):
        raise KeeprError(f"{source}: unsupported synthesis network option {key!r}={synthesis[key]!r} "
                         f"(a StyleGAN3 or other non-StyleGAN2 generator?)")
    for key in _SYNTHESIS_IGNORED:
        synthesis.pop(key, None)
    arch = synthesis.get("architecture", "skip")
    if arch not in ("skip", "orig"):
        raise KeeprError(f"{source}: unsupported synthesis architecture {arch!r} (KEEP:R supports 'skip' and 'orig')")
    for key in ("z_dim", "w_dim", "img_resolution"):
        if key not in kwargs:
            raise KeeprError(f"{source}: generator config lacks {key!r}")
    res = int(kwargs["img_resolution"])
    if res < 4 or res & (res - 1):
        raise KeeprError(f"{source}: img_resolution {res} is not a power of two >= 4")
    return dict(z_dim=int(kwargs["z_dim"]), c_dim=int(kwargs.get("c_dim", 0) or 0), w_dim=int(kwargs["w_dim"]),
                img_resolution=res, img_channels=int(kwargs.get("img_channels", 3)),
                mapping_kwargs=mapping, synthesis_kwargs=synthesis)


def load_generator_config(config: str | Path) -> dict:
    """``init_kwargs`` from a YAML/JSON file (``configs/generator/*.yaml``) or a config name ('tiny', 'ffhq256',
    ...)."""
    path = Path(config)
    if not path.exists() and not path.suffix:
        path = CONFIG_DIR / f"{config}.yaml"
    if not path.exists():
        raise KeeprError(f"{path}: generator config not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise KeeprError(f"{path}: not valid YAML/JSON ({' '.join(str(exc).split())[:100]})") from None
    if not isinstance(data, dict):
        raise KeeprError(f"{path}: generator config must be a mapping")
    return normalize_init_kwargs(data.get("init_kwargs", data), str(path))


def build_generator(init_kwargs: Mapping[str, Any], seed: Optional[int] = None, source: str = "config") -> Generator:
    """Construct a Generator (NVlabs random init); with ``seed``, deterministic and independent of the global RNG."""
    kwargs = normalize_init_kwargs(init_kwargs, source)
    if seed is None:
        return Generator(**kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Generator(**kwargs)


@torch.no_grad()
def compute_w_avg(G: Generator, num_samples: int = 10000, seed: int = 0, batch_size: int = 2500) -> torch.Tensor:
    """Mean mapping output over ``num_samples`` fixed-seed z (what ``w_avg`` converges to); stored into G."""
    if G.c_dim > 0:
        raise KeeprError("computing w_avg for a conditional generator needs labels; not supported")
    gen = torch.Generator().manual_seed(seed)
    device = G.mapping.w_avg.device
    total = torch.zeros([G.w_dim], dtype=torch.float64)
    for start in range(0, num_samples, batch_size):
        z = torch.randn([min(batch_size, num_samples - start), G.z_dim], generator=gen).to(device)
        w = G.mapping(z, None, truncation_psi=1, skip_w_avg_update=True)[:, 0]
        total += w.double().sum(dim=0).cpu()
    G.mapping.w_avg.copy_((total / num_samples).float())
    return G.mapping.w_avg


def make_tiny_generator(seed: int = 0, config: str | Path = "tiny") -> Generator:
    """Deterministic random-init generator from ``configs/generator/tiny.yaml`` (64x64, z_dim = w_dim = 64, num_ws 10).

    NVlabs init (weights randn, affine biases 1, noise strengths 0); ``w_avg`` is the mean mapping output of 10k
    fixed-seed z so truncation is meaningful. Eval mode, frozen, like ``load_generator``.
    """
    G = build_generator(load_generator_config(config), seed=seed, source=str(config))
    compute_w_avg(G, num_samples=10000, seed=seed)
    return G.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------------
# Loading.

def load_generator(path: str | Path, device: str | torch.device = "cpu") -> Generator:
    """Load a StyleGAN2 generator from an NVlabs pickle, a rosinality checkpoint or KEEP:R's .safetensors.

    The network is built from the file's own config and returned in eval mode with ``requires_grad`` off
    (call ``G.requires_grad_(True)`` to fine-tune it).
    """
    path = Path(path)
    if not path.is_file():
        raise missing("generator", path)
    kind = sniff_format(path)
    if kind == "empty":
        raise KeeprError(f"{path}: empty file (an interrupted download?)")
    if kind == "safetensors":
        G = _load_safetensors(path)
    elif kind == "torch":
        G = _load_torch_checkpoint(path)
    elif kind == "pickle":
        G = _load_network_pickle(path)
    else:
        raise KeeprError(f"{path}: unknown file format (not a network pickle, torch checkpoint or safetensors file)")
    return G.to(device).eval().requires_grad_(False)


def sniff_format(path: Path) -> str:
    """'safetensors', 'torch' (zip or legacy torch.save), 'pickle' (NVlabs network pickle), 'empty' or 'unknown'."""
    with open(path, "rb") as f:
        head = f.read(16)
    size = path.stat().st_size
    if not head:
        return "empty"
    if head[:4] == b"PK\x03\x04":
        return "torch"
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and 0 < n <= size - 8:
            return "safetensors"
        if head[8:9] == b"{":
            return "safetensors"  # header longer than the file: truncated; reported by the safetensors reader
    if head[:1] == b"\x80":
        # Legacy (non-zip) torch.save files start with the pickled magic number 0x1950a86a20f9469cfc6c.
        if head[2:4] == b"\x8a\x0a" and head[4:14] == (0x1950A86A20F9469CFC6C).to_bytes(10, "little"):
            return "torch"
        return "pickle"
    return "unknown"


def _load_network_pickle(path: Path) -> Generator:
    data = safe_load_network_pickle(path)
    if isinstance(data, PersistentRecord):
        data = {"G_ema": data} if data.class_name == "Generator" else {}
    if not isinstance(data, dict) or "G_ema" not in data:
        keys = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise KeeprError(f"{path}: not a StyleGAN network pickle (no 'G_ema'; found {keys})")
    rec = data["G_ema"]
    if not isinstance(rec, PersistentRecord) or not isinstance(rec.state, dict):
        raise KeeprError(f"{path}: 'G_ema' is not a network object")
    if rec.class_name != "Generator":
        raise KeeprError(f"{path}: 'G_ema' is a {rec.class_name!r}, not a Generator")
    state = flatten_record(rec, str(path))
    if any(k.startswith("synthesis.input.") for k in state):
        raise KeeprError(f"{path}: StyleGAN3 (-T/-R) generator: not supported, KEEP:R needs a StyleGAN2 generator")
    args = list(rec.state.get("_init_args") or [])
    kwargs = dict(rec.state.get("_init_kwargs") or {})
    if not args and not kwargs:
        raise KeeprError(f"{path}: 'G_ema' carries no constructor config (_init_kwargs)")
    names = ["z_dim", "c_dim", "w_dim", "img_resolution", "img_channels", "mapping_kwargs", "synthesis_kwargs"]
    if len(args) > len(names):
        raise KeeprError(f"{path}: unexpected positional constructor arguments {args!r}")
    kwargs.update(zip(names, args))
    init_kwargs = normalize_init_kwargs(kwargs, str(path))
    return generator_from_state_dict(state, init_kwargs, str(path))


def _load_torch_checkpoint(path: Path) -> Generator:
    # rosinality training snapshots store their argparse `args`: plain data, allow-listed.
    ckpt = torch_load_weights(path, "StyleGAN2 torch checkpoint", safe_globals=[argparse.Namespace])
    if not isinstance(ckpt, dict):
        raise KeeprError(f"{path}: not a StyleGAN2 checkpoint (top level is {type(ckpt).__name__})")
    if "g_ema" in ckpt:
        sd = ckpt["g_ema"]
        if not isinstance(sd, dict):
            raise KeeprError(f"{path}: 'g_ema' is not a state dict")
        return generator_from_rosinality(sd, ckpt.get("latent_avg"), str(path))
    if "G_ema" in ckpt or "G" in ckpt:
        raise KeeprError(f"{path}: torch checkpoint with 'G'/'G_ema' objects: pass the network pickle (.pkl) instead")
    if _looks_rosinality(ckpt):
        return generator_from_rosinality(ckpt, ckpt.get("latent_avg"), str(path))
    raise KeeprError(f"{path}: not a rosinality StyleGAN2 checkpoint (no 'g_ema'; top-level keys: "
                     f"{sorted(map(str, ckpt))[:8]})")


def _load_safetensors(path: Path) -> Generator:
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise KeeprError(f"{path}: cannot read the StyleGAN2 generator: the safetensors file is truncated or corrupt "
                         f"({' '.join(str(exc).split())}).") from None
    if metadata.get("format") == KEEPR_FORMAT:
        if metadata.get("format_version") != KEEPR_FORMAT_VERSION:
            raise KeeprError(f"{path}: KEEP:R generator format version {metadata.get('format_version')!r} "
                             f"is not supported (expected {KEEPR_FORMAT_VERSION})")
        try:
            init_kwargs = json.loads(metadata["init_kwargs"])
        except (KeyError, json.JSONDecodeError):
            raise KeeprError(f"{path}: KEEP:R generator file with missing or invalid 'init_kwargs' metadata") from None
        return generator_from_state_dict(state, normalize_init_kwargs(init_kwargs, str(path)), str(path))
    if _looks_rosinality(state):
        return generator_from_rosinality(state, state.pop("latent_avg", None), str(path))
    for cand in (path.with_suffix(".json"), path.parent / "config.json"):
        if cand.is_file():
            try:
                cfg = json.loads(cand.read_text())
            except json.JSONDecodeError as exc:
                raise KeeprError(f"{cand}: invalid JSON ({exc})") from None
            if isinstance(cfg, dict) and ("init_kwargs" in cfg or "z_dim" in cfg):
                init_kwargs = normalize_init_kwargs(cfg.get("init_kwargs", cfg), str(cand))
                return generator_from_state_dict(state, init_kwargs, f"{path} (config {cand.name})")
    raise KeeprError(f"{path}: safetensors file without a generator config (no KEEP:R metadata and no sibling "
                     f"{path.with_suffix('.json').name} or config.json with 'init_kwargs')")


def generator_from_state_dict(state: Mapping[str, torch.Tensor], init_kwargs: Mapping[str, Any],
                              source: str) -> Generator:
    """Build ``Generator(**init_kwargs)`` and load ``state`` strictly (names and shapes); errors name ``source``."""
    try:
        with torch.device("meta"):
            G = Generator(**init_kwargs)
    except (TypeError, ValueError) as exc:
        raise KeeprError(f"{source}: cannot build a generator from its config ({exc})") from None
    expected = G.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {list(state[k].shape)} (expected {list(v.shape)})" for k, v in expected.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {', '.join(unexpected[:4])}"
                        f"{' ...' if len(unexpected) > 4 else ''}")
    if wrong:
        problems.append(f"{len(wrong)} wrong shapes: {'; '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''}")
    if problems:
        raise KeeprError(f"{source}: weights do not match the generator config: " + "; ".join(problems))
    G = G.to_empty(device="cpu")
    G.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)
    return G


# ----------------------------------------------------------------------------------------------------------------
# rosinality <-> NVlabs.

_ROS_STYLE = re.compile(r"^style\.(\d+)\.weight$")


def _looks_rosinality(state: Mapping[str, Any]) -> bool:
    return any(_ROS_STYLE.match(str(k)) for k in state) and "input.input" in state


def rosinality_config(state: Mapping[str, torch.Tensor], source: str) -> dict:
    """NVlabs ``init_kwargs`` derived from rosinality tensor shapes (size, style_dim, n_mlp, channels, filter)."""
    try:
        idx = sorted(int(m.group(1)) for k in state if (m := _ROS_STYLE.match(k)))
        n_mlp = len(idx)
        if idx != list(range(1, n_mlp + 1)):
            raise KeeprError(f"{source}: mapping layers style.{idx} are not numbered 1..{n_mlp}")
        z_dim = int(state["style.1.weight"].shape[1])
        w_dim = int(state[f"style.{n_mlp}.weight"].shape[0])
        rgb = sorted(int(m.group(1)) for k in state if (m := re.match(r"^to_rgbs\.(\d+)\.conv\.weight$", k)))
        log2 = (rgb[-1] + 3) if rgb else 2
        if rgb != list(range(len(rgb))):
            raise KeeprError(f"{source}: to_rgbs layers {rgb} are not numbered 0..{len(rgb) - 1}")
        channels = {4: int(state["input.input"].shape[1])}
        for k in range(3, log2 + 1):
            channels[2 ** k] = int(state[f"convs.{2 * (k - 3) + 1}.conv.weight"].shape[1])
        img_channels = int(state["to_rgb1.conv.weight"].shape[1])
    except KeyError as exc:
        raise KeeprError(f"{source}: rosinality checkpoint lacks {exc.args[0]!r}") from None
    except (IndexError, AttributeError) as exc:
        raise KeeprError(f"{source}: rosinality checkpoint has unexpected tensor shapes ({exc})") from None
    base, cmax = _channel_base_max(channels, source)
    synthesis = dict(channel_base=base, channel_max=cmax, num_fp16_res=0, conv_clamp=None, architecture="skip",
                     resample_filter=_rosinality_filter(state, source))
    mapping = dict(num_layers=n_mlp, lr_multiplier=0.01)
    return normalize_init_kwargs(dict(z_dim=z_dim, c_dim=0, w_dim=w_dim, img_resolution=2 ** log2,
                                      img_channels=img_channels, mapping_kwargs=mapping,
                                      synthesis_kwargs=synthesis), source)


def _channel_base_max(channels: dict[int, int], source: str) -> tuple[int, int]:
    """(channel_base, channel_max) with ``min(base // R, max) == channels[R]`` for every R; rosinality's table first."""
    top = max(channels.values())
    # The smallest exact candidate: c * R at a resolution below the cap (rosinality: 256m * 64 = 16384m).
    cands = [c * r for r, c in sorted(channels.items()) if c < top] + [top * max(channels)]
    for base in cands:
        if all(min(base // r, top) == c for r, c in channels.items()):
            return base, top
    raise KeeprError(f"{source}: channel widths {channels} do not follow min(channel_base / R, channel_max)")


def _rosinality_filter(state: Mapping[str, torch.Tensor], source: str) -> list:
    kernel = state.get("convs.0.conv.blur.kernel", state.get("to_rgbs.0.upsample.kernel"))
    if kernel is None:
        return [1, 3, 3, 1]
    k = kernel.double()
    taps = k.sum(dim=1)
    if k.ndim != 2 or k.shape[0] != k.shape[1] or (k < 0).any() or taps.sum() <= 0 or not torch.allclose(
            torch.outer(taps, taps) / taps.sum() ** 2 * k.sum(), k, rtol=1e-4, atol=1e-6):
        raise KeeprError(f"{source}: rosinality blur kernel is not a separable low-pass filter: {k.tolist()}")
    taps = taps / taps[0]
    default = torch.tensor([1, 3, 3, 1], dtype=torch.float64)
    if taps.shape == default.shape and torch.allclose(taps, default, atol=1e-5):
        return [1, 3, 3, 1]
    return [float(t) for t in taps]


def rosinality_to_nvlabs(state: Mapping[str, torch.Tensor], num_layers: int, img_resolution: int,
                         source: str) -> dict[str, torch.Tensor]:
    """Rename a rosinality ``g_ema`` state dict to NVlabs keys and shapes (filter buffers become our constants)."""
    out: dict[str, torch.Tensor] = {}
    used = set()

    def take(src: str, dst: str, shape_fn=lambda t: t) -> None:
        if src not in state:
            raise KeeprError(f"{source}: rosinality checkpoint lacks {src!r}")
        used.add(src)
        out[dst] = shape_fn(state[src])

    for i in range(num_layers):
        take(f"style.{i + 1}.weight", f"mapping.fc{i}.weight")
        take(f"style.{i + 1}.bias", f"mapping.fc{i}.bias")
    take("input.input", "synthesis.b4.const", lambda t: t.reshape(t.shape[1:]) if t.ndim == 4 else t)

    def conv(src: str, dst: str, noise: str) -> None:
        take(f"{src}.conv.weight", f"{dst}.weight", lambda t: t.reshape(t.shape[1:]) if t.ndim == 5 else t)
        take(f"{src}.conv.modulation.weight", f"{dst}.affine.weight")
        take(f"{src}.conv.modulation.bias", f"{dst}.affine.bias")
        take(f"{src}.activate.bias", f"{dst}.bias")
        take(f"{src}.noise.weight", f"{dst}.noise_strength", lambda t: t.reshape([]))
        take(noise, f"{dst}.noise_const", lambda t: t.reshape(t.shape[-2:]))

    def torgb(src: str, dst: str) -> None:
        take(f"{src}.conv.weight", f"{dst}.weight", lambda t: t.reshape(t.shape[1:]) if t.ndim == 5 else t)
        take(f"{src}.conv.modulation.weight", f"{dst}.affine.weight")
        take(f"{src}.conv.modulation.bias", f"{dst}.affine.bias")
        take(f"{src}.bias", f"{dst}.bias", lambda t: t.reshape(-1))

    conv("conv1", "synthesis.b4.conv1", "noises.noise_0")
    torgb("to_rgb1", "synthesis.b4.torgb")
    log2 = img_resolution.bit_length() - 1
    for k in range(3, log2 + 1):
        for j in (0, 1):
            conv(f"convs.{2 * (k - 3) + j}", f"synthesis.b{2 ** k}.conv{j}", f"noises.noise_{2 * k - 5 + j}")
        torgb(f"to_rgbs.{k - 3}", f"synthesis.b{2 ** k}.torgb")
    extra = [k for k in state if k not in used and not k.endswith((".blur.kernel", ".upsample.kernel"))]
    if extra:
        raise KeeprError(f"{source}: unexpected rosinality keys: {', '.join(sorted(extra)[:4])}"
                         f"{' ...' if len(extra) > 4 else ''}")
    return out


def generator_from_rosinality(state: Mapping[str, torch.Tensor], latent_avg: Optional[torch.Tensor],
                              source: str) -> Generator:
    """rosinality ``g_ema`` (+ ``latent_avg``) -> Generator. Without ``latent_avg``, w_avg is computed (10k z)."""
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    init_kwargs = rosinality_config(state, source)
    nv = rosinality_to_nvlabs(state, init_kwargs["mapping_kwargs"]["num_layers"], init_kwargs["img_resolution"], source)
    missing_w_avg = latent_avg is None
    nv["mapping.w_avg"] = (torch.zeros([init_kwargs["w_dim"]]) if missing_w_avg
                           else torch.as_tensor(latent_avg, dtype=torch.float32).reshape(-1))
    nv.update(_filters(init_kwargs))  # rosinality's blur kernels are the same constants, scaled
    G = generator_from_state_dict(nv, init_kwargs, source)
    if missing_w_avg:
        compute_w_avg(G)
    return G


def _filters(init_kwargs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The constant ``resample_filter`` buffers of a generator config."""
    f = setup_filter(init_kwargs["synthesis_kwargs"].get("resample_filter", [1, 3, 3, 1]))
    out = {}
    log2 = int(init_kwargs["img_resolution"]).bit_length() - 1
    for k in range(2, log2 + 1):
        r = 2 ** k
        out[f"synthesis.b{r}.resample_filter"] = f.clone()
        if k > 2:
            out[f"synthesis.b{r}.conv0.resample_filter"] = f.clone()
        out[f"synthesis.b{r}.conv1.resample_filter"] = f.clone()
    return out


def nvlabs_to_rosinality(state: Mapping[str, torch.Tensor], init_kwargs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The reverse renaming (NVlabs keys -> rosinality keys and shapes, filter buffers rebuilt), e.g. for export."""
    kw = normalize_init_kwargs(init_kwargs)
    f = torch.as_tensor(kw["synthesis_kwargs"].get("resample_filter", [1, 3, 3, 1]), dtype=torch.float32)
    kernel = torch.outer(f, f)
    kernel = kernel / kernel.sum() * 4
    out: dict[str, torch.Tensor] = {}
    for i in range(kw["mapping_kwargs"].get("num_layers", 8)):
        out[f"style.{i + 1}.weight"] = state[f"mapping.fc{i}.weight"]
        out[f"style.{i + 1}.bias"] = state[f"mapping.fc{i}.bias"]
    out["input.input"] = state["synthesis.b4.const"][None]

    def conv(src, dst, noise):
        out[f"{dst}.conv.weight"] = state[f"{src}.weight"][None]
        out[f"{dst}.conv.modulation.weight"] = state[f"{src}.affine.weight"]
        out[f"{dst}.conv.modulation.bias"] = state[f"{src}.affine.bias"]
        out[f"{dst}.activate.bias"] = state[f"{src}.bias"]
        out[f"{dst}.noise.weight"] = state[f"{src}.noise_strength"].reshape(1)
        out[noise] = state[f"{src}.noise_const"][None, None]

    def torgb(src, dst):
        out[f"{dst}.conv.weight"] = state[f"{src}.weight"][None]
        out[f"{dst}.conv.modulation.weight"] = state[f"{src}.affine.weight"]
        out[f"{dst}.conv.modulation.bias"] = state[f"{src}.affine.bias"]
        out[f"{dst}.bias"] = state[f"{src}.bias"].reshape(1, -1, 1, 1)

    conv("synthesis.b4.conv1", "conv1", "noises.noise_0")
    torgb("synthesis.b4.torgb", "to_rgb1")
    for k in range(3, kw["img_resolution"].bit_length()):
        for j in (0, 1):
            conv(f"synthesis.b{2 ** k}.conv{j}", f"convs.{2 * (k - 3) + j}", f"noises.noise_{2 * k - 5 + j}")
        out[f"convs.{2 * (k - 3)}.conv.blur.kernel"] = kernel.clone()
        torgb(f"synthesis.b{2 ** k}.torgb", f"to_rgbs.{k - 3}")
        out[f"to_rgbs.{k - 3}.upsample.kernel"] = kernel.clone()
    return out
