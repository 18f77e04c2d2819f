"""ArcFace identity network (IR / IR-SE ResNet backbone) in the layout of TreB1eN/InsightFace_Pytorch.

This is the face-recognition network behind the "ID loss" and the identity-similarity columns of pSp, e4e and
HyperStyle: weights ``model_ir_se50.pth`` (TreB1eN/InsightFace_Pytorch, as used by pSp/e4e), a 50-layer "improved
residual" ResNet with squeeze-and-excitation gates, 112x112 aligned RGB crops in [-1, 1] in, a 512-d L2-normalised
embedding out. Two faces are compared by the dot product (cosine similarity) of their embeddings.

Written from the published description (the fixture README in ``tests/fixtures/arcface``):

* stem ``input_layer``: conv 3x3 (3 -> C0, no bias), BatchNorm2d, PReLU;
* ``body.0 .. body.N``: residual units in four stages (3, 4, 14, 3 units for 50 layers); the first unit of each
  stage has stride 2. A unit returns ``res_layer(x) + shortcut(x)`` with no activation after the sum; the shortcut
  is a subsampling ``x[:, :, ::s, ::s]`` when the width does not change, else conv 1x1 (stride s) + BatchNorm2d.
  ``res_layer`` = BatchNorm2d, conv 3x3, PReLU, conv 3x3 (stride s), BatchNorm2d and, for ``ir_se``, an SE gate
  (mean over H, W -> 1x1 conv C -> C//16 -> ReLU -> 1x1 conv -> sigmoid -> per-channel scale);
* head ``output_layer``: BatchNorm2d, Dropout (identity in eval), flatten (C, H, W order), Linear C3*7*7 -> E,
  BatchNorm1d(E); then division by the L2 norm.

Key names and shapes are those of the reference ``state_dict`` (``input_layer.*``, ``output_layer.*``, ``body.*``);
``num_batches_tracked`` entries are optional when loading.

API: :func:`build_arcface`, :func:`load_arcface`, :func:`arcface_input` (pSp's ID-loss preprocessing of 256x256
FFHQ-aligned faces) and :class:`ArcFaceRecognizer` (photos in, embeddings and cosine similarities out).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from keepr.errors import KeeprError
from keepr.registry import missing, where
from keepr.weights import read_state_dict

__all__ = [
    "WHERE_TO_GET", "STAGE_UNITS", "Backbone", "build_arcface", "load_arcface", "arcface_input",
    "ArcFaceRecognizer", "cosine_similarity", "PSP_CROP", "ALIGNED_SIZE",
]

WHERE_TO_GET = where("arcface")
WHAT = "ArcFace IR-SE-50 identity network"

# Units per stage for each depth of the reference (50 is the one pSp/e4e use).
STAGE_UNITS = {50: (3, 4, 14, 3), 100: (3, 13, 30, 3), 152: (3, 8, 36, 3)}
SE_REDUCTION = 16
BN_EPS = 1e-5

# pSp / e4e ID loss: rows 35..222, columns 32..219 of a 256x256 FFHQ-aligned face, pooled to 112x112.
ALIGNED_SIZE = 256
PSP_CROP = (35, 223, 32, 220)  # (row0, row1, col0, col1), end-exclusive: a 188x188 window


class SEModule(nn.Module):
    """Squeeze-and-excitation gate: x * sigmoid(fc2(relu(fc1(mean_hw(x))))) with bias-free 1x1 convs."""

    def __init__(self, channels: int, reduction: int = SE_REDUCTION):
        super().__init__()
        hidden = channels // reduction
        if hidden < 1:
            raise KeeprError(f"ArcFace ir_se: a width of {channels} gives an SE gate with no hidden channel "
                             f"(width // {reduction} = 0); ir_se widths must be >= {reduction}")
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1, bias=False)
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = x.mean(dim=(2, 3), keepdim=True)
        g = torch.sigmoid(self.fc2(F.relu(self.fc1(g))))
        return x * g


class Subsample(nn.Module):
    """Parameter-free shortcut: every ``stride``-th row and column (a 1x1 max-pool with that stride)."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = int(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            return x
        return x[:, :, :: self.stride, :: self.stride]


class Unit(nn.Module):
    """One improved-residual unit ``(cin, cout, stride)``: res_layer(x) + shortcut(x), no activation after."""

    def __init__(self, cin: int, cout: int, stride: int, se: bool):
        super().__init__()
        if cin == cout:
            self.shortcut_layer = Subsample(stride)
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(cout, eps=BN_EPS),
            )
        layers = [
            nn.BatchNorm2d(cin, eps=BN_EPS),
            nn.Conv2d(cin, cout, kernel_size=3, stride=1, padding=1, bias=False),
            nn.PReLU(cout),
            nn.Conv2d(cout, cout, kernel_size=3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(cout, eps=BN_EPS),
        ]
        if se:
            layers.append(SEModule(cout))
        self.res_layer = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class Backbone(nn.Module):
    """The IR / IR-SE ResNet with the ArcFace embedding head; ``forward`` returns the L2-normalised embedding.

    Submodules are registered in the reference's order (input_layer, output_layer, body) so that ``state_dict()``
    lists the keys in the same order as the reference file.
    """

    def __init__(self, num_layers: int = 50, mode: str = "ir_se", widths: Sequence[int] = (64, 128, 256, 512),
                 embedding_size: int = 512, input_size: int = 112, affine: bool = True, drop_ratio: float = 0.4):
        super().__init__()
        if num_layers not in STAGE_UNITS:
            raise KeeprError(f"ArcFace num_layers must be one of {sorted(STAGE_UNITS)}, got {num_layers}")
        if mode not in ("ir", "ir_se"):
            raise KeeprError(f"ArcFace mode must be 'ir' or 'ir_se', got {mode!r}")
        if input_size not in (112, 224):
            raise KeeprError(f"ArcFace input_size must be 112 or 224, got {input_size}")
        widths = tuple(int(w) for w in widths)
        if len(widths) != 4 or min(widths) < 1:
            raise KeeprError(f"ArcFace widths must be four positive stage widths, got {widths}")
        self.num_layers, self.mode, self.widths = num_layers, mode, widths
        self.embedding_size, self.input_size, self.affine = int(embedding_size), int(input_size), bool(affine)
        c0, c3 = widths[0], widths[3]
        final = input_size // 16  # four stride-2 stages: 112 -> 7, 224 -> 14

        self.input_layer = nn.Sequential(
            nn.Conv2d(3, c0, kernel_size=3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(c0, eps=BN_EPS),
            nn.PReLU(c0),
        )
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(c3, eps=BN_EPS),
            nn.Dropout(drop_ratio),
            nn.Flatten(),
            nn.Linear(c3 * final * final, self.embedding_size),
            nn.BatchNorm1d(self.embedding_size, eps=BN_EPS, affine=self.affine),
        )
        units, self.stage_ends = [], []
        cin = c0
        for width, n in zip(widths, STAGE_UNITS[num_layers]):
            for k in range(n):
                units.append(Unit(cin if k == 0 else width, width, 2 if k == 0 else 1, se=(mode == "ir_se")))
            cin = width
            self.stage_ends.append(len(units) - 1)
        self.body = nn.Sequential(*units)

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every intermediate the parity fixture names: input_layer, stage1..stage4, embedding_prenorm, embedding."""
        self._check_input(x)
        out = {}
        h = self.input_layer(x)
        out["input_layer"] = h
        stage = 0
        for i, unit in enumerate(self.body):
            h = unit(h)
            if i == self.stage_ends[stage]:
                stage += 1
                out[f"stage{stage}"] = h
        v = self.output_layer(h)
        out["embedding_prenorm"] = v
        out["embedding"] = v / v.norm(p=2, dim=1, keepdim=True)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] RGB in [-1, 1] (S = input_size) -> [N, E] L2-normalised embeddings."""
        self._check_input(x)
        v = self.output_layer(self.body(self.input_layer(x)))
        return v / v.norm(p=2, dim=1, keepdim=True)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[2:]) != (self.input_size, self.input_size):
            raise KeeprError(f"ArcFace expects [N, 3, {self.input_size}, {self.input_size}] input, "
                             f"got {tuple(x.shape)}")


def build_arcface(num_layers: int = 50, mode: str = "ir_se", widths: Sequence[int] = (64, 128, 256, 512),
                  embedding_size: int = 512, input_size: int = 112, affine: bool = True) -> Backbone:
    """An ArcFace backbone with freshly initialised weights, in eval mode (the defaults are ``model_ir_se50.pth``)."""
    return Backbone(num_layers=num_layers, mode=mode, widths=widths, embedding_size=embedding_size,
                    input_size=input_size, affine=affine).eval()


def _strip_prefix(state: dict) -> dict:
    """Drop a ``module.`` prefix (a DataParallel save) when every key has it; otherwise return ``state``."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def load_state(model: Backbone, state: dict, path: str = "<state dict>") -> Backbone:
    """Load ``state`` into ``model`` strictly (``num_batches_tracked`` optional); one-line KeeprError otherwise."""
    state = _strip_prefix(dict(state))
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise KeeprError(f"{path}: the {WHAT} file does not hold a tensor state dict (entry {bad[0]!r} is a "
                         f"{type(state[bad[0]]).__name__})")
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise KeeprError(f"{path}: not a {model.num_layers}-layer {model.mode} ArcFace state dict with widths "
                         f"{list(model.widths)} and embedding {model.embedding_size}: keys "
                         f"{' and '.join(parts)}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise KeeprError(f"{path}: {k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)} for this "
                             f"ArcFace configuration")
    full = {k: state.get(k, own[k]) for k in own}
    model.load_state_dict(full, strict=True)
    return model


def load_arcface(path: str | os.PathLike, device: str | torch.device = "cpu", **build_kwargs) -> Backbone:
    """ArcFace backbone with the weights of ``path`` (a ``.pth`` state dict, read with ``weights_only=True``, or
    ``.safetensors``), in eval mode on ``device`` with gradients off.

    ``build_kwargs`` go to :func:`build_arcface` (the defaults fit ``model_ir_se50.pth``). A missing file is a
    :class:`~keepr.errors.MissingWeightsError` naming where to get it; a file holding pickled objects, a damaged
    file or one whose keys or shapes do not fit is a one-line KeeprError.
    """
    p = Path(path)
    if not p.is_file():
        raise missing("arcface", path)
    state = read_state_dict(p, WHAT)
    model = load_state(build_arcface(**build_kwargs), state, str(path))
    return model.to(device).eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------------------------
# Preprocessing and a recogniser for photos.


def _adaptive_avg_pool_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] averaging weights of adaptive average pooling: output i averages inputs
    floor(i * n_in / n_out) .. ceil((i + 1) * n_in / n_out) - 1."""
    m = np.zeros((n_out, n_in), dtype=np.float64)
    for i in range(n_out):
        a = (i * n_in) // n_out
        b = -((-(i + 1) * n_in) // n_out)
        m[i, a:b] = 1.0 / (b - a)
    return m


def arcface_input(aligned: np.ndarray | torch.Tensor) -> torch.Tensor:
    """pSp's ID-loss preprocessing: 256x256 FFHQ-aligned RGB faces -> [N, 3, 112, 112] float32 in [-1, 1].

    ``aligned``: uint8 [H, W, 3] or [N, H, W, 3] (H = W = 256), or a float tensor [N, 3, 256, 256] already in
    [-1, 1]. Pixels are mapped by (p / 255 - 0.5) / 0.5, rows 35..222 and columns 32..219 are cropped (188x188) and
    pooled to 112x112 by adaptive average pooling (overlapping 2-3 pixel windows), as pSp/e4e do.
    """
    if isinstance(aligned, torch.Tensor) and aligned.is_floating_point():
        x = aligned.float()
        if x.ndim == 3:
            x = x[None]
    else:
        a = np.asarray(aligned.cpu() if isinstance(aligned, torch.Tensor) else aligned)
        if a.ndim == 3:
            a = a[None]
        if a.ndim != 4 or a.shape[-1] != 3 or a.dtype != np.uint8:
            raise KeeprError(f"ArcFace input: expected uint8 RGB [H, W, 3] or [N, H, W, 3], got {a.dtype} "
                             f"{tuple(a.shape)}")
        x = torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).float() / 255.0
        x = (x - 0.5) / 0.5
    if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[2:]) != (ALIGNED_SIZE, ALIGNED_SIZE):
        raise KeeprError(f"ArcFace input: expected {ALIGNED_SIZE}x{ALIGNED_SIZE} aligned faces, got {tuple(x.shape)}")
    r0, r1, c0, c1 = PSP_CROP
    return F.adaptive_avg_pool2d(x[:, :, r0:r1, c0:c1], (112, 112)).contiguous()


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two embeddings (their dot product when both are L2-normalised, as ArcFace's are)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"embedding shapes differ: {a.shape} vs {b.shape}")
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        raise ValueError("cosine similarity of a zero vector")
    return float(np.dot(a, b) / (na * nb))


class ArcFaceRecognizer:
    """Identity embeddings of face photos with the IR-SE-50 ArcFace network, as pSp/e4e compute them.

    Alignment: the fixture README states the network's 112x112 input only as pSp builds it, so this follows pSp's
    usage: the face is aligned FFHQ-style to 256x256 (:func:`anonymizer.faces.align_face`, from dlib's 68
    landmarks), rows 35..222 / columns 32..219 are cropped and pooled to 112x112 (:func:`arcface_input`), RGB order
    in [-1, 1]. (This is not InsightFace's 5-point 112x112 similarity alignment; numbers are comparable with pSp's
    identity-similarity tables, not with InsightFace's LFW protocol.)

    path: ``model_ir_se50.pth`` (or a ``.safetensors`` of the same state dict); ``build_kwargs`` for other variants.
    A model object can be given instead of a path (``model=``), e.g. in tests.
    """

    def __init__(self, path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                 model: Backbone | None = None, detector: str = "hog", upsample: int = 1, **build_kwargs):
        if model is None:
            if path is None:
                raise KeeprError("ArcFaceRecognizer needs a weights path (model_ir_se50.pth)")
            model = load_arcface(path, device=device, **build_kwargs)
        self.model = model.eval().requires_grad_(False)
        self.device = torch.device(device)
        self.detector, self.upsample = detector, upsample
        self.path = None if path is None else str(path)

    @torch.no_grad()
    def embed(self, aligned_rgb: np.ndarray) -> np.ndarray:
        """Embedding(s) of FFHQ-aligned 256x256 uint8 RGB face(s) ([H, W, 3] -> [E], [N, H, W, 3] -> [N, E]),
        or of already cropped 112x112 uint8 RGB input (fed as is, mapped to [-1, 1])."""
        a = np.asarray(aligned_rgb)
        single = a.ndim == 3
        batch = a[None] if single else a
        if batch.ndim == 4 and batch.shape[1:3] == (112, 112) and batch.dtype == np.uint8:
            x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        else:
            x = arcface_input(batch)
        e = self.model(x.to(self.device)).double().cpu().numpy()
        return e[0] if single else e

    def embed_face(self, rgb: np.ndarray, landmarks: np.ndarray | None = None) -> np.ndarray | None:
        """Embedding [E] of the face with these 68 landmarks in a photo, or of its largest detected face when
        ``landmarks`` is None; None when no face is found."""
        from anonymizer.faces import align_face, detect_faces  # heavy (cv2): only in embed_face()
        from keepr.images import to_rgb_uint8  # heavy (cv2): only in embed_face()

        rgb = to_rgb_uint8(rgb)
        if landmarks is None:
            faces = detect_faces(rgb, self.detector, self.upsample)
            if not faces:
                return None
            landmarks = faces[0].landmarks
        return self.embed(align_face(rgb, landmarks, ALIGNED_SIZE).image)

    @staticmethod
    def similarity(a: np.ndarray, b: np.ndarray) -> float:
        """Cosine similarity of two embeddings (1: same direction; pSp's ID loss is 1 - similarity)."""
        return cosine_similarity(a, b)
