#!/usr/bin/env bash
# End-to-end demo with the tiny random-init models (what `make demo` runs); about 5-10 minutes on 2 CPU cores.
#   1. tiny generator + tiny co-part model      -> outputs/tiny/
#   2. 4000 (image, latent) pairs               -> outputs/pairs/tiny/
#   3. encoder, short demo schedule             -> outputs/encoder_tiny_demo/encoder.safetensors
#   4. infer.py on data/samples/lrwp9a.mpg      -> outputs/demo/ (anonymized.mp4, candidates.png, report.json)
# Steps whose output already exists are skipped (the pair set is resumed or re-checked) (delete outputs/ to start over). DEMO_PAIRS overrides the pair count.
# The tiny generator and co-part model are random, so the "virtual face" is a texture and the part mask covers
# little of the face: the coverage check blurs it (the fallback). The demo shows the machinery, not virtual faces.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
OUT=${DEMO_OUT:-outputs/demo}
PAIRS=${DEMO_PAIRS:-4000}
export WANDB_MODE=${WANDB_MODE:-offline} WANDB_SILENT=true
start=$(date +%s)

if [ ! -f outputs/tiny/generator_tiny.safetensors ] || [ ! -f outputs/tiny/cosegmentation_tiny.pth.tar ]; then
  echo "== 1/4 tiny models"
  "$PY" -m scripts.make_tiny_models --out outputs/tiny
fi
# Always run: generate_pairs.py resumes an interrupted set and only re-checks a complete one.
echo "== 2/4 tiny pairs"
"$PY" generate_pairs.py --config configs/pairs/tiny.yaml --generator outputs/tiny/generator_tiny.safetensors \
  --out_dir outputs/pairs/tiny --num_pairs "$PAIRS"
if [ ! -f outputs/encoder_tiny_demo/encoder.safetensors ]; then
  echo "== 3/4 encoder (demo schedule)"
  "$PY" train_encoder.py fit --config configs/encoder/tiny.yaml --config configs/encoder/tiny_demo.yaml
fi
echo "== 4/4 anonymize data/samples/lrwp9a.mpg"
rm -rf "$OUT"
"$PY" infer.py --config configs/infer/tiny.yaml --video data/samples/lrwp9a.mpg --out "$OUT"
echo
echo "demo done in $(( $(date +%s) - start )) s. Output in $OUT/: anonymized.mp4 (the video), candidates.png (the 9"
echo "candidates and their identity distances), virtual_face.png (the chosen one, skin-matched), latent.npy (its"
echo "latent) and report.json (every frame, every face found and what was done to it: report.json 'coverage')."
echo "Note: the tiny models have random weights, so the 'virtual face' is a texture and the co-part model's part mask"
echo "covers little of the face; the coverage check then applies the fallback (blur) to every face the swap does not"
echo "cover, and the demo's output shows a blurred face. Use the official weights (configs/infer/default.yaml) for"
echo "virtual faces."
echo "Sample clip: GRID audio-visual sentence corpus, M. Cooke, J. Barker, S. Cunningham, X. Shao (2006), JASA" \
     "120(5):2421-2424, doi:10.5281/zenodo.3625687, CC BY 4.0 (data/samples/ATTRIBUTION.md)."
