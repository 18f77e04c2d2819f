"""Export the encoder of a training checkpoint to the file inference loads.

    python -m scripts.export_encoder --ckpt outputs/encoder_tiny/checkpoints/last.ckpt \
        --out outputs/encoder_tiny/encoder.safetensors [--generator PATH]

train_encoder.py already exports the best checkpoint when fit ends; use this for any other checkpoint. The checkpoint
is read with ``torch.load(weights_only=True)``; the generator (default: the one recorded in the checkpoint) is hashed
into the export so ``models.encoder.load_encoder`` can refuse a different one.
"""
from __future__ import annotations

import argparse

from keepr.errors import KeeprError, cli_main
from models.encoder import save_encoder
from training.encoder_module import checkpoint_generator_path, checkpoint_generator_sha256, load_encoder_from_checkpoint


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(description="Export a trained encoder checkpoint to .safetensors.")
    p.add_argument("--ckpt", required=True, help="Lightning checkpoint written by train_encoder.py")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--generator", default=None,
                   help="generator the encoder was trained for (default: from the checkpoint)")
    args = p.parse_args(argv)
    encoder = load_encoder_from_checkpoint(args.ckpt)
    generator = args.generator or checkpoint_generator_path(args.ckpt)
    if not generator:
        raise KeeprError(f"{args.ckpt}: no generator path recorded; pass --generator")
    # A generator given for a moved one is checked against the sha256 the checkpoint recorded (older ones: None).
    out = save_encoder(encoder, args.out, generator, extra={"source": str(args.ckpt)},
                       generator_sha256=checkpoint_generator_sha256(args.ckpt))
    print(f"exported {args.ckpt} -> {out}")


if __name__ == "__main__":
    main()
