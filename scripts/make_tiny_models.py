"""Write the tiny random-init models used by the demo and the tests (deterministic per seed).

    python scripts/make_tiny_models.py --out DIR [--seed 0]

writes DIR/generator_tiny.safetensors (KEEP:R StyleGAN2 format) and DIR/cosegmentation_tiny.pth.tar
(config: configs/cosegmentation/tiny.yaml).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from keepr.errors import cli_main  # noqa: E402


@cli_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="random-init seed")
    args = parser.parse_args(argv)

    from models.cosegmentation import make_tiny_cosegmentation
    from models.stylegan2 import make_tiny_generator

    args.out.mkdir(parents=True, exist_ok=True)
    gen_path = args.out / "generator_tiny.safetensors"
    make_tiny_generator(seed=args.seed).save(gen_path)
    print(f"wrote {gen_path}")
    seg_path = args.out / "cosegmentation_tiny.pth.tar"
    make_tiny_cosegmentation(config="configs/cosegmentation/tiny.yaml", seed=args.seed).save(seg_path)
    print(f"wrote {seg_path}")


if __name__ == "__main__":
    main()
