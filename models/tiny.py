"""The tiny random-init models of the demo, the tests and the benchmarks, built in one place (deterministic per seed).

    from models.tiny import make_tiny_models
    paths = make_tiny_models("outputs/tiny")   # -> {"generator", "cosegmentation", "cosegmentation_config",
                                               #     "encoder", "config"}

The tiny generator (configs/generator/tiny.yaml, ``make_tiny_generator``), the tiny co-part model
(configs/cosegmentation/tiny.yaml, ``make_tiny_cosegmentation``) and an untrained encoder of the tiny architecture
(configs/encoder/tiny.yaml) bound to that generator, plus an infer config (configs/infer/tiny.yaml with the model
paths set). Random weights: they check the machinery, not the look. ``python -m scripts.make_tiny_models`` is the CLI.
"""
from __future__ import annotations

from pathlib import Path

import torch
import yaml

from models.cosegmentation import make_tiny_cosegmentation
from models.encoder import Encoder, save_encoder
from models.stylegan2 import Generator, make_tiny_generator

ROOT = Path(__file__).resolve().parents[1]
COSEG_CONFIG = ROOT / "configs" / "cosegmentation" / "tiny.yaml"
ENCODER_CONFIG = ROOT / "configs" / "encoder" / "tiny.yaml"
INFER_CONFIG = ROOT / "configs" / "infer" / "tiny.yaml"

GENERATOR_FILE = "generator_tiny.safetensors"
COSEG_FILE = "cosegmentation_tiny.pth.tar"
ENCODER_FILE = "encoder.safetensors"
INFER_FILE = "infer.yaml"


def tiny_encoder(G: Generator, seed: int = 0) -> Encoder:
    """An untrained encoder of the tiny architecture (configs/encoder/tiny.yaml) for ``G``, torch's default init
    under ``torch.manual_seed(seed)``."""
    cfg = yaml.safe_load(ENCODER_CONFIG.read_text())["model"]["encoder"]
    torch.manual_seed(seed)
    return Encoder(w_dim=G.w_dim, num_ws=G.num_ws, img_resolution=G.img_resolution, **cfg)


def make_tiny_models(out_dir: str | Path, crop_size: int | None = None, *, seed: int = 0, encoder: bool = True,
                     cosegmentation_config: str | Path | None = None) -> dict[str, str]:
    """Write the tiny models into ``out_dir`` and return the infer model paths (strings).

    ``crop_size``: the tiny co-part architecture at this crop size (its config written next to the models);
    ``cosegmentation_config``: another co-part architecture instead (random weights). ``encoder=False`` writes only
    the generator and the co-part model (what the demo trains an encoder for); otherwise the untrained encoder and
    ``infer.yaml`` (configs/infer/tiny.yaml pointing at these files: key ``config``) too.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen = out / GENERATOR_FILE
    G = make_tiny_generator(seed=seed)
    G.save(gen)
    if cosegmentation_config is not None:
        coseg_cfg = Path(cosegmentation_config)
    elif crop_size is not None:
        cfg = yaml.safe_load(COSEG_CONFIG.read_text())
        cfg["dataset_params"]["image_shape"] = [crop_size, crop_size, 3]
        coseg_cfg = out / f"cosegmentation_tiny{crop_size}.yaml"
        coseg_cfg.write_text(yaml.safe_dump(cfg))
    else:
        coseg_cfg = COSEG_CONFIG
    seg = out / COSEG_FILE
    make_tiny_cosegmentation(config=str(coseg_cfg), seed=seed).save(seg)
    paths = {"generator": str(gen), "cosegmentation": str(seg), "cosegmentation_config": str(coseg_cfg)}
    if not encoder:
        return paths
    paths["encoder"] = str(save_encoder(tiny_encoder(G, seed), out / ENCODER_FILE, gen))
    infer = yaml.safe_load(INFER_CONFIG.read_text())
    infer.update({k: paths[k] for k in ("generator", "encoder", "cosegmentation", "cosegmentation_config")})
    (out / INFER_FILE).write_text(yaml.safe_dump(infer, sort_keys=False))
    paths["config"] = str(out / INFER_FILE)
    return paths
