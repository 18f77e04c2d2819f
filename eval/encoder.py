"""Evaluate a trained encoder: latent and re-synthesis errors on held-out pairs, identity kept on real photos.

    python -m eval.encoder --encoder outputs/encoder_tiny/encoder.safetensors \
        --generator outputs/tiny/generator_tiny.safetensors --pairs outputs/pairs_tiny --out results/encoder_tiny

Pairs (the validation split used in training, or ``--split all`` for a separately generated set): latent MSE,
cosine similarity of w and of its offset from w_avg, re-synthesis pixel MSE, and the latent MSE of the trivial
``w_avg`` predictor. Photos: each is aligned (FFHQ-style, to the generator's resolution), encoded and re-synthesised;
the dlib identity distance between the photo's face and the re-synthesis is reported, or "no face" when dlib finds
no face in the re-synthesis (no number is made up). With ``--arcface model_ir_se50.pth`` the ArcFace IR-SE-50
identity similarity of pSp's tables is reported too (cosine of the embeddings of the aligned photo and its
re-synthesis, both at 256x256 with pSp's crop; "unavailable" without weights).
Writes ``encoder_pairs.csv``, ``encoder_photos.csv``, ``encoder_eval.md`` and ``encoder_reconstructions.png``
(inputs next to reconstructions) into ``--out``.
"""
from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from anonymizer.faces import align_face, detect_faces
from anonymizer.identity import SAME_PERSON_THRESHOLD, FaceRecognizer, descriptor_distance
from keepr.errors import KeeprError, cli_main
from keepr.fileio import atomic_path, sha256_file, write_text_atomic
from keepr.images import load_image, to_float_image, to_uint8
from models.arcface import ArcFaceRecognizer
from models.encoder import load_encoder, read_encoder_metadata
from models.stylegan2 import load_generator

ROOT = Path(__file__).resolve().parents[1]

PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
DEFAULT_PHOTOS = ROOT / "tests" / "fixtures" / "media" / "photos"
DETECT_MIN_SIDE = 256  # Re-syntheses smaller than this are upscaled before dlib looks for a face.
ARCFACE_UNAVAILABLE = "unavailable (no weights: pass --arcface model_ir_se50.pth)"


def to_uint8_hwc(img: torch.Tensor) -> np.ndarray:
    """Generator-range float [3,H,W] -> uint8 HxWx3 (the pair set's conversion)."""
    return to_uint8(img.detach().float().cpu()).permute(1, 2, 0).numpy()


def from_uint8_hwc(rgb: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 -> float [1,3,H,W] in [-1,1] (the encoder's training input)."""
    return to_float_image(torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).unsqueeze(0))


@torch.no_grad()
def evaluate_pairs(encoder, G, pairs_root: str | Path, split: str = "val", val_fraction: float = 0.05,
                   max_pairs: int | None = None, batch_size: int = 32, device: str = "cpu",
                   generator_sha256: str | None = None):
    """Metrics over the chosen pairs, plus up to 8 (input, re-synthesis) uint8 examples for the figure."""
    from datasets.pairs import PairDataModule, PairDataset  # heavy (lightning): only in evaluate_pairs()

    if split == "val":
        dm = PairDataModule(str(pairs_root), batch_size=batch_size, val_fraction=val_fraction)
        dm.setup()
        indices, dataset = dm.val_indices, dm.dataset
    elif split == "all":
        dataset = PairDataset(pairs_root)
        indices = list(range(len(dataset)))
    else:
        raise KeeprError(f"--split must be 'val' or 'all', got {split!r}")
    if generator_sha256 is not None and dataset.manifest["generator"]["sha256"] != generator_sha256:
        raise KeeprError(f"{pairs_root}: pairs were made by another generator "
                         f"({dataset.manifest['generator']['path']})")
    if max_pairs:
        indices = indices[:max_pairs]
    if not indices:
        raise KeeprError(f"{pairs_root}: no pairs in split {split!r}")
    w_avg = encoder.w_avg.reshape(1, 1, -1)
    sums = dict(latent_mse=0.0, latent_mse_wavg=0.0, latent_cos=0.0, offset_cos=0.0, pixel_mse=0.0, pixel_mse_wavg=0.0)
    synth_avg = G.synthesis(w_avg.expand(1, encoder.num_ws, -1), noise_mode="const")
    w_all, examples = [], []
    for start in range(0, len(indices), batch_size):
        items = [dataset[i] for i in indices[start:start + batch_size]]
        img = to_float_image(torch.stack([it["image"] for it in items]).to(device))
        w = torch.stack([it["w"] for it in items]).to(device).float()
        target = w.unsqueeze(1).expand(-1, encoder.num_ws, -1)
        ws = encoder(img)
        synth = G.synthesis(ws, noise_mode="const")
        if synth.shape[-2:] != img.shape[-2:]:
            synth = F.interpolate(synth, size=img.shape[-2:], mode="bilinear", align_corners=False, antialias=True)
        sums["latent_mse"] += (ws - target).square().mean(dim=(1, 2)).sum().item()
        sums["latent_mse_wavg"] += (w_avg - target).square().mean(dim=(1, 2)).sum().item()
        sums["latent_cos"] += F.cosine_similarity(ws, target, dim=2).mean(dim=1).sum().item()
        sums["offset_cos"] += F.cosine_similarity(ws - w_avg, target - w_avg, dim=2).mean(dim=1).sum().item()
        sums["pixel_mse"] += (synth - img).square().mean(dim=(1, 2, 3)).sum().item()
        sums["pixel_mse_wavg"] += (synth_avg - img).square().mean(dim=(1, 2, 3)).sum().item()
        w_all.append(w.cpu())
        for k in range(min(len(items), 8 - len(examples))):
            examples.append((f"pair {int(items[k]['index'])}", to_uint8_hwc(img[k]), to_uint8_hwc(synth[k])))
    n = len(indices)
    metrics = {k: v / n for k, v in sums.items()}
    w_all = torch.cat(w_all)
    metrics["latent_var"] = (w_all - w_all.mean(dim=0)).square().mean().item()
    metrics["latent_mse_ratio"] = metrics["latent_mse"] / metrics["latent_mse_wavg"]
    metrics["latent_mse_var_ratio"] = (metrics["latent_mse"] / metrics["latent_var"] if metrics["latent_var"] > 0
                                       else float("nan"))
    metrics["num_pairs"] = n
    return metrics, examples


def list_photos(photos: str | Path) -> list[Path]:
    photos = Path(photos)
    if photos.is_file():
        return [photos]
    if not photos.is_dir():
        raise KeeprError(f"{photos}: photo directory not found")
    return sorted(p for p in photos.rglob("*") if p.suffix.lower() in PHOTO_SUFFIXES and p.is_file())


def arcface_similarity(arcface, aligned: np.ndarray, resynth: np.ndarray) -> float:
    """pSp's identity similarity: cosine of the ArcFace embeddings of an aligned photo and its re-synthesis, both
    resized to 256x256 (area when shrinking, bicubic when enlarging) and cropped/pooled to 112x112 as pSp does."""

    def at256(img):
        if img.shape[0] == 256:
            return img
        return cv2.resize(img, (256, 256), interpolation=cv2.INTER_AREA if img.shape[0] > 256 else cv2.INTER_CUBIC)

    e = arcface.embed(np.stack([at256(aligned), at256(resynth)]))
    return float(np.dot(e[0], e[1]))


@torch.no_grad()
def evaluate_photos(encoder, G, photo_paths, recognizer, root: Path | None = None, device: str = "cpu",
                    arcface=None):
    """Per photo: align, encode, re-synthesise, dlib identity distance (None with a reason when not computable) and,
    with ``arcface`` (a :class:`models.arcface.ArcFaceRecognizer`), the ArcFace identity similarity."""

    rows, examples = [], []
    for path in photo_paths:
        name = str(path.relative_to(root)) if root is not None and path.is_relative_to(root) else path.name
        row = {"photo": name, "face_in_photo": False, "face_in_resynthesis": False, "identity_distance": "",
               "same_person": "", "arcface_similarity": "" if arcface is not None else ARCFACE_UNAVAILABLE,
               "note": ""}
        rgb = load_image(path)
        faces = detect_faces(rgb)
        if not faces:
            row["note"] = "no face in photo"
            rows.append(row)
            continue
        row["face_in_photo"] = True
        face = faces[0]
        aligned = align_face(rgb, face.landmarks, G.img_resolution).image
        ws = encoder(from_uint8_hwc(aligned).to(device))
        resynth = to_uint8_hwc(G.synthesis(ws, noise_mode="const")[0])
        examples.append((name, aligned, resynth))
        if arcface is not None:  # needs no detection in the re-synthesis: both crops share the photo's alignment
            row["arcface_similarity"] = f"{arcface_similarity(arcface, aligned, resynth):.4f}"
        ref = recognizer.descriptor(rgb, face)
        probe_img = resynth
        if resynth.shape[0] < DETECT_MIN_SIDE:
            probe = torch.from_numpy(resynth).permute(2, 0, 1).float().unsqueeze(0)
            probe = F.interpolate(probe, size=(DETECT_MIN_SIDE, DETECT_MIN_SIDE), mode="bicubic", align_corners=False)
            probe_img = probe.clamp(0, 255).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()
        probe_desc = recognizer.descriptor(probe_img)
        if ref is None or probe_desc is None:
            row["note"] = "no face in re-synthesis" if probe_desc is None else "no descriptor for photo face"
            rows.append(row)
            continue
        row["face_in_resynthesis"] = True
        d = descriptor_distance(ref, probe_desc)
        row["identity_distance"] = f"{d:.4f}"
        row["same_person"] = bool(d < SAME_PERSON_THRESHOLD)
        rows.append(row)
    return rows, examples


def figure(examples, path: Path, cell: int = 128) -> None:
    """PNG grid: one row per example, input | reconstruction, with its label."""

    label_h = 14
    cols = 2
    sheet = Image.new("RGB", (cols * cell, max(len(examples), 1) * (cell + label_h) + label_h), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 1), "input", fill="black")
    draw.text((cell + 4, 1), "reconstruction", fill="black")
    for r, (name, inp, rec) in enumerate(examples):
        y = label_h + r * (cell + label_h)
        draw.text((4, y + 1), name[:40], fill="black")
        for c, im in enumerate((inp, rec)):
            sheet.paste(Image.fromarray(im).resize((cell, cell), Image.BICUBIC), (c * cell, y + label_h))
    with atomic_path(path, suffix=".png") as tmp:
        sheet.save(tmp, format="PNG")


def _csv_text(rows: list[dict], fields: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _md_table(rows: list[dict], fields: list[str]) -> str:
    lines = ["| " + " | ".join(fields) + " |", "|" + "---|" * len(fields)]
    lines += ["| " + " | ".join(str(r.get(f, "")) for f in fields) + " |" for r in rows]
    return "\n".join(lines)


def _fmt(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def write_report(out: Path, pair_metrics: dict | None, photo_rows: list[dict], examples, info: dict) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    md = ["# Encoder evaluation", ""]
    md += [f"- {k}: `{v}`" for k, v in info.items()] + [""]
    if pair_metrics is not None:
        rows = [{"metric": k, "value": _fmt(v)} for k, v in pair_metrics.items()]
        paths["pairs_csv"] = out / "encoder_pairs.csv"
        write_text_atomic(paths["pairs_csv"], _csv_text(rows, ["metric", "value"]))
        md += ["## Held-out pairs", "", _md_table(rows, ["metric", "value"]), ""]
    fields = ["photo", "face_in_photo", "face_in_resynthesis", "identity_distance", "same_person",
              "arcface_similarity", "note"]
    paths["photos_csv"] = out / "encoder_photos.csv"
    write_text_atomic(paths["photos_csv"], _csv_text(photo_rows, fields))
    dists = [float(r["identity_distance"]) for r in photo_rows if r["identity_distance"] != ""]
    md += ["## Real photos (dlib identity distance, same person below 0.6)", "",
           f"Re-syntheses with a face: {len(dists)} of "
           f"{sum(bool(r['face_in_photo']) for r in photo_rows)} aligned photos"
           + (f"; mean distance {np.mean(dists):.4f}" if dists else "; no distance can be computed") + ".", "",
           _md_table(photo_rows, fields), ""]
    sims = [float(r["arcface_similarity"]) for r in photo_rows
            if r.get("arcface_similarity") not in ("", None, ARCFACE_UNAVAILABLE)]
    md += ["ArcFace IR-SE-50 identity similarity (pSp's, higher keeps more identity): "
           + (f"mean {np.mean(sims):.4f} over {len(sims)} photos." if sims else
              ARCFACE_UNAVAILABLE if any(r.get("arcface_similarity") == ARCFACE_UNAVAILABLE for r in photo_rows)
              else "no photo with a face."), ""]
    paths["figure"] = out / "encoder_reconstructions.png"
    figure(examples, paths["figure"])
    md += [f"![inputs and reconstructions]({paths['figure'].name})", ""]
    paths["markdown"] = out / "encoder_eval.md"
    write_text_atomic(paths["markdown"], "\n".join(md))
    return paths


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--encoder", required=True, help="exported encoder (.safetensors)")
    p.add_argument("--generator", default=None, help="generator file (default: the one recorded in the encoder export)")
    p.add_argument("--pairs", default=None, help="pair directory (omit to skip the pair metrics)")
    p.add_argument("--split", default="val", choices=["val", "all"],
                   help="which pairs: training's validation split or all")
    p.add_argument("--val_fraction", type=float, default=0.05, help="val_fraction used in training (for --split val)")
    p.add_argument("--max_pairs", type=int, default=None)
    p.add_argument("--photos", default=str(DEFAULT_PHOTOS), help="photo file or directory (searched recursively)")
    p.add_argument("--out", required=True, help="output directory for the tables and the figure")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--arcface", default=None,
                   help="ArcFace IR-SE-50 model_ir_se50.pth (TreB1eN/InsightFace_Pytorch, as in pSp/e4e): adds pSp's "
                        "identity similarity")
    args = p.parse_args(argv)

    arcface = None
    if args.arcface:  # missing or unreadable weights: one-line error before any work

        arcface = ArcFaceRecognizer(args.arcface, device=args.device)
    meta = read_encoder_metadata(args.encoder)
    generator = args.generator or meta["generator"]["path"]
    encoder = load_encoder(args.encoder, generator, device=args.device)
    G = load_generator(generator, device=args.device).eval().requires_grad_(False)

    pair_metrics, examples = None, []
    if args.pairs:
        pair_metrics, examples = evaluate_pairs(encoder, G, args.pairs, args.split, args.val_fraction, args.max_pairs,
                                                args.batch_size, args.device, generator_sha256=sha256_file(generator))
    photos_root = Path(args.photos)
    photo_rows, photo_examples = evaluate_photos(encoder, G, list_photos(photos_root), FaceRecognizer(),
                                                 root=photos_root if photos_root.is_dir() else None, device=args.device,
                                                 arcface=arcface)
    info = {"encoder": args.encoder, "generator": generator, "pairs": args.pairs, "split": args.split,
            "photos": args.photos, "arcface": args.arcface}
    paths = write_report(Path(args.out), pair_metrics, photo_rows, examples + photo_examples, info)
    if pair_metrics is not None:
        print("pairs: " + ", ".join(f"{k}={_fmt(v)}" for k, v in pair_metrics.items()))
    found = sum(r["face_in_resynthesis"] for r in photo_rows)
    print(f"photos: {len(photo_rows)} read, {found} re-syntheses with a face; report {paths['markdown']}")
    return paths


if __name__ == "__main__":
    main()
