"""Write the tiny random-init models used by the demo and the tests (deterministic per seed).

    python -m scripts.make_tiny_models --out DIR [--seed 0]

writes DIR/generator_tiny.safetensors (KEEP:R StyleGAN2 format) and DIR/cosegmentation_tiny.pth.tar
(config: configs/cosegmentation/tiny.yaml); a thin CLI over ``models.tiny.make_tiny_models``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from keepr.errors import cli_main
from models.tiny import make_tiny_models


@cli_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="random-init seed")
    args = parser.parse_args(argv)

    paths = make_tiny_models(args.out, seed=args.seed, encoder=False)
    print(f"wrote {paths['generator']}")
    print(f"wrote {paths['cosegmentation']}")


if __name__ == "__main__":
    main()
