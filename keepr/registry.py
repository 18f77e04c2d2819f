"""The official weight files KEEP:R reads: what each is, where it comes from, its licence. One place.

Every "missing weights" message is made here (:func:`missing`), and the README's weights table is :func:`table`
(a test keeps the two equal). Nothing is ever downloaded: the user fetches these files and passes their paths.
"""
from __future__ import annotations

from dataclasses import dataclass

from keepr.errors import MissingWeightsError


@dataclass(frozen=True)
class WeightFile:
    files: str  # the file name(s) as published
    what: str  # what the file is, as the messages name it
    where: str  # where it comes from (a release page, or the command that makes it)
    licence: str
    used_by: str


WEIGHTS: dict[str, WeightFile] = {
    "generator": WeightFile(
        "`ffhq.pkl` (NVlabs network pickle, 1024 px; 256 px variants too) or `stylegan2-ffhq-config-f.pt` "
        "(rosinality layout)",
        "StyleGAN2 FFHQ generator",
        "NVlabs stylegan2-ada-pytorch pretrained networks (https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/"
        "pretrained/ffhq.pkl), or rosinality/stylegan2-pytorch's converted checkpoint (as used by pSp / e4e)",
        "NVIDIA Source Code License-NC (non-commercial)",
        "generate_pairs.py, train_encoder.py, infer.py"),
    "encoder": WeightFile(
        "`encoder_ffhq256.safetensors`",
        "trained encoder",
        "a training run of your own (python train_encoder.py fit --config configs/encoder/ffhq256.yaml, see README)",
        "yours",
        "infer.py, eval"),
    "cosegmentation": WeightFile(
        "`vox-5segments.pth.tar`, `vox-10segments.pth.tar`, `vox-15segments.pth.tar`",
        "co-part segmentation checkpoint",
        "the authors' release of AliaksandrSiarohin/motion-cosegmentation (its README links the vox-*segments "
        ".pth.tar checkpoints, 256x256 face crops)",
        "CC BY-NC 4.0",
        "infer.py"),
    "arcface": WeightFile(
        "`model_ir_se50.pth`",
        "ArcFace IR-SE-50 identity network",
        "TreB1eN/InsightFace_Pytorch (model_ir_se50.pth, as used by pSp/e4e)",
        "MIT (code); weights trained on MS-Celeb-1M: research use",
        "eval (identity similarity, verification)"),
    "lpips_alex": WeightFile(
        "`alexnet-owt-7be5be79.pth`",
        "AlexNet backbone for LPIPS",
        "torchvision's ImageNet AlexNet weights (https://download.pytorch.org/models/alexnet-owt-7be5be79.pth)",
        "BSD-3-Clause (torchvision)",
        "LPIPS loss and metric"),
    "lpips_vgg": WeightFile(
        "`vgg16-397923af.pth`",
        "VGG16 backbone for LPIPS",
        "torchvision's ImageNet VGG16 weights (https://download.pytorch.org/models/vgg16-397923af.pth)",
        "BSD-3-Clause (torchvision)",
        "LPIPS loss"),
    "inception": WeightFile(
        "`inception_v3_google-0cc3c7bd.pth`",
        "Inception-v3 for FID/KID",
        "torchvision's ImageNet Inception-v3 weights (https://download.pytorch.org/models/"
        "inception_v3_google-0cc3c7bd.pth)",
        "BSD-3-Clause (torchvision)",
        "FID / KID"),
}


def where(key: str) -> str:
    return WEIGHTS[key].where


def missing(key: str, path, what: str | None = None) -> MissingWeightsError:
    """The error for a missing file of kind ``key`` at ``path`` ("missing weights: PATH (what) not found; get it
    from: where")."""
    w = WEIGHTS[key]
    return MissingWeightsError(str(path), what or w.what, w.where)


def table() -> str:
    """The README's Markdown table of official weights."""
    rows = ["| file | what | where | licence | used by |", "|---|---|---|---|---|"]
    rows += [f"| {w.files} | {w.what} | {w.where} | {w.licence} | {w.used_by} |" for w in WEIGHTS.values()]
    return "\n".join(rows) + "\n"
