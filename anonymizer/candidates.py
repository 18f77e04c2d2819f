"""Virtual-face candidates: encode the aligned target, add noise to its latent, synthesise 9 faces.

The noise is Gaussian in W, scaled per dimension by the spread of W (the standard deviation of the mapping
network's outputs over many z, estimated once per generator and cached) times ``noise_scale``, and added only to
the style layers chosen by ``layers``:

- ``coarse``: ws that drive the 4x4 and 8x8 blocks (pose, face shape),
- ``middle``: 16x16 and 32x32 (facial features, hair style, eyes open/closed),
- ``fine``:   64x64 and above (colour scheme, micro-structure).

One noise vector is drawn per candidate and added to every selected layer, so the code stays a coherent W+ latent
(``per_layer=True`` draws an independent vector for each layer instead).

Identity guard (KEEP:R's addition): a candidate is only useful if it is *not* the target person. The dlib 128-d
descriptor distance between each candidate and the target is computed; a candidate closer than
``guard_threshold`` (default 0.6, dlib's same-person threshold) is redrawn with fresh noise, up to
``max_redraws`` times; if all redraws stay too close it is returned with status "rejected". A candidate in which
dlib finds no face is returned with status "no face" and no distance (it is not redrawn: a generator that makes no
detectable faces, such as the tiny random test generator, would make none on redraw either).

Determinism: draw ``r`` of candidate ``k`` uses noise seeded by (seed, k, r) alone, so the same seed gives the same
9 faces however many redraws other candidates needed.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Callable, Sequence

import cv2
import numpy as np
import torch

from anonymizer.faces import detect_faces
from anonymizer.identity import (
    SAME_PERSON_THRESHOLD,
    FaceRecognizer,
    descriptor_distance,
)
from keepr.errors import KeeprError
from keepr.images import to_float_image, to_rgb_uint8, to_uint8

__all__ = [
    "LAYER_GROUPS", "Candidate", "ws_resolutions", "layer_mask", "estimate_w_spread", "encode_face",
    "synthesize", "guard_descriptor", "identity_check", "make_candidates", "candidate_grid",
]

LAYER_GROUPS = {"coarse": (4, 8), "middle": (16, 32), "fine": (64, 1 << 30)}  # inclusive resolution ranges
GUARD_MIN_SIZE = 256  # candidates are upscaled to at least this before face detection (HOG needs ~80 px faces)


@dataclass(eq=False)
class Candidate:
    """One virtual face.

    image:    uint8 RGB [R,R,3] at the generator's resolution.
    ws:       float32 tensor [1, num_ws, w_dim], the latent that made it (on the CPU).
    distance: dlib descriptor distance to the target, None if no face was found in the candidate (or the guard
              is off).
    status:   "ok" (distance >= threshold), "rejected" (still too close after all redraws), "no face"
              (dlib found no face in it) or "unchecked" (identity guard off).
    draws:    number of noise draws it took (1 = first draw accepted).
    index:    position 0..num-1.
    """

    index: int
    image: np.ndarray
    ws: torch.Tensor
    distance: float | None
    status: str
    draws: int = 1
    history: list = field(default_factory=list)  # distances of the rejected earlier draws


# ----------------------------------------------------------------------------------------------------------------
# Layers and the spread of W


def ws_resolutions(num_ws: int, img_resolution: int) -> list[int]:
    """Resolution of the synthesis block that each ws index drives (NVlabs layout).

    b4 takes ws[0] (conv) and ws[1] (toRGB); every later block b{R} takes two conv ws starting one after the previous
    block's conv ws, plus a toRGB ws shared with the next block's first conv. So ws[0] -> 4, ws[1:3] -> 8,
    ws[3:5] -> 16, ...; the very last index is the final toRGB (the top resolution).
    """
    res = [min(4 * 2 ** ((i + 1) // 2), img_resolution) for i in range(num_ws)]
    expected = 2 * int(np.log2(img_resolution)) - 2
    if num_ws != expected:
        raise KeeprError(f"num_ws={num_ws} does not match a StyleGAN2 synthesis network of resolution "
                         f"{img_resolution} (expected {expected})")
    return res


def layer_mask(num_ws: int, img_resolution: int, layers: Sequence[str] | str) -> torch.Tensor:
    """bool [num_ws]: which ws belong to the given groups ("coarse", "middle", "fine", or "all")."""
    if isinstance(layers, str):
        layers = tuple(LAYER_GROUPS) if layers == "all" else (layers,)
    unknown = [g for g in layers if g not in LAYER_GROUPS]
    if unknown or not layers:
        raise KeeprError(f"noise layers must be a non-empty subset of {list(LAYER_GROUPS)}, got {list(layers)}")
    res = ws_resolutions(num_ws, img_resolution)
    keep = [any(LAYER_GROUPS[g][0] <= r <= LAYER_GROUPS[g][1] for g in layers) for r in res]
    return torch.tensor(keep, dtype=torch.bool)


_SPREAD_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


@torch.no_grad()
def estimate_w_spread(G, num_samples: int = 10000, seed: int = 0, batch_size: int = 1000) -> torch.Tensor:
    """Per-dimension standard deviation of W = mapping(z), z ~ N(0, I), over ``num_samples`` fixed-seed draws.

    float32 [w_dim] on the CPU. Cached per generator object (and sample count and seed).
    """
    key = (int(num_samples), int(seed))
    cache = _SPREAD_CACHE.setdefault(G, {})
    if key in cache:
        return cache[key]
    device = _device_of(G)
    gen = torch.Generator().manual_seed(int(seed))
    total = torch.zeros(G.w_dim, dtype=torch.float64)
    total_sq = torch.zeros(G.w_dim, dtype=torch.float64)
    for start in range(0, num_samples, batch_size):
        n = min(batch_size, num_samples - start)
        z = torch.randn([n, G.z_dim], generator=gen).to(device)
        w = G.mapping(z, None, skip_w_avg_update=True)[:, 0].double().cpu()
        total += w.sum(dim=0)
        total_sq += (w * w).sum(dim=0)
    mean = total / num_samples
    var = (total_sq / num_samples - mean * mean).clamp_min(0.0) * num_samples / max(num_samples - 1, 1)
    spread = var.sqrt().float()
    cache[key] = spread
    return spread


def _device_of(module) -> torch.device:
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")


# ----------------------------------------------------------------------------------------------------------------
# Encode / synthesise


@torch.no_grad()
def encode_face(encoder: Callable, aligned_rgb: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """ws [1, num_ws, w_dim] of an aligned uint8 RGB face crop (the encoder takes float NCHW in [-1, 1])."""
    rgb = to_rgb_uint8(aligned_rgb, "aligned target")
    x = to_float_image(torch.from_numpy(rgb).permute(2, 0, 1)[None]).to(device)
    ws = encoder(x)
    if ws.ndim != 3 or ws.shape[0] != 1:
        raise KeeprError(f"encoder returned shape {tuple(ws.shape)}, expected [1, num_ws, w_dim]")
    return ws.float()


@torch.no_grad()
def synthesize(G, ws: torch.Tensor) -> np.ndarray:
    """uint8 RGB [N,R,R,3] from ws [N, num_ws, w_dim] (constant noise inputs, so it is deterministic)."""
    img = G.synthesis(ws.to(_device_of(G)), noise_mode="const")
    return to_uint8(img.float()).permute(0, 2, 3, 1).cpu().numpy()


def _noise(seed: int, index: int, draw: int, num_ws: int, w_dim: int, per_layer: bool) -> torch.Tensor:
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(index), int(draw)]).generate_state(2)
    gen = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    if per_layer:
        return torch.randn([num_ws, w_dim], generator=gen)
    return torch.randn([1, w_dim], generator=gen).expand(num_ws, w_dim)


# ----------------------------------------------------------------------------------------------------------------
# Identity guard


def guard_descriptor(recognizer: FaceRecognizer, rgb: np.ndarray) -> np.ndarray | None:
    """Descriptor of the face in an aligned crop (upscaled to >= GUARD_MIN_SIZE so HOG can find it), or None."""
    rgb = to_rgb_uint8(rgb)
    if rgb.shape[0] < GUARD_MIN_SIZE:
        s = GUARD_MIN_SIZE / rgb.shape[0]
        rgb = cv2.resize(rgb, (round(rgb.shape[1] * s), round(rgb.shape[0] * s)), interpolation=cv2.INTER_CUBIC)
    faces = detect_faces(rgb, recognizer.detector, recognizer.upsample)
    if not faces:
        return None
    return recognizer.descriptor(rgb, faces[0])


def identity_check(recognizer: FaceRecognizer, candidate_rgb: np.ndarray, target_descriptor: np.ndarray,
                   threshold: float = SAME_PERSON_THRESHOLD) -> tuple[float | None, str]:
    """(distance, status) of one candidate image against the target's descriptor: status "ok" when the distance is
    at least ``threshold``, "too close" when below it, "no face" (distance None) when dlib finds no face."""
    desc = guard_descriptor(recognizer, candidate_rgb)
    if desc is None:
        return None, "no face"
    dist = descriptor_distance(desc, target_descriptor)
    return dist, ("ok" if dist >= threshold else "too close")


def make_candidates(G, encoder: Callable | None, aligned_target_rgb: np.ndarray, num: int = 9,
                    noise_scale: float = 1.0, layers: Sequence[str] | str = ("coarse", "middle"), seed: int = 0,
                    guard_threshold: float | None = SAME_PERSON_THRESHOLD, max_redraws: int = 5,
                    recognizer: FaceRecognizer | None = None, per_layer: bool = False,
                    target_ws: torch.Tensor | None = None, spread_samples: int = 10000) -> list[Candidate]:
    """``num`` virtual-face candidates for an aligned target face.

    G:                StyleGAN2 generator (``models.stylegan2``); encoder: image -> ws (``models.encoder``); it is
                      skipped when ``target_ws`` [1, num_ws, w_dim] is given.
    aligned_target_rgb: uint8 RGB FFHQ-aligned crop of the target (any size; the encoder resizes).
    noise_scale:      noise std as a multiple of W's per-dimension spread (0 reproduces the encoding).
    layers:           style-layer groups that get noise: subset of ("coarse", "middle", "fine") or "all".
    seed:             the same seed gives the same candidates.
    guard_threshold:  minimum dlib distance to the target (None turns the identity guard off: status "unchecked").
    max_redraws:      extra draws allowed per candidate that is too close to the target.
    recognizer:       FaceRecognizer to use (default: a new one with HOG detection).
    """
    if num < 1:
        raise KeeprError(f"number of candidates must be >= 1, got {num}")
    if noise_scale < 0:
        raise KeeprError(f"noise_scale must be >= 0, got {noise_scale}")
    if max_redraws < 0:
        raise KeeprError(f"max_redraws must be >= 0, got {max_redraws}")
    device = _device_of(G)
    if target_ws is None:
        if encoder is None:
            raise KeeprError("make_candidates needs an encoder or target_ws")
        target_ws = encode_face(encoder, aligned_target_rgb, device)
    target_ws = target_ws.detach().float().cpu()
    if tuple(target_ws.shape) != (1, G.num_ws, G.w_dim):
        raise KeeprError(f"target latent has shape {tuple(target_ws.shape)}, generator expects "
                         f"[1, {G.num_ws}, {G.w_dim}] (encoder trained for another generator?)")
    mask = layer_mask(G.num_ws, G.img_resolution, layers).float()[:, None]  # [num_ws, 1]
    spread = estimate_w_spread(G, num_samples=spread_samples) if noise_scale > 0 else torch.zeros(G.w_dim)

    def latent(index: int, draw: int) -> torch.Tensor:
        eps = _noise(seed, index, draw, G.num_ws, G.w_dim, per_layer)
        return target_ws + (noise_scale * spread[None, :] * eps * mask)[None]

    guard = guard_threshold is not None
    target_desc = None
    if guard:
        recognizer = recognizer or FaceRecognizer()
        target_desc = guard_descriptor(recognizer, aligned_target_rgb)
        if target_desc is None:
            raise KeeprError("identity guard: no face found in the aligned target crop; check the alignment or "
                             "turn the guard off (guard_threshold=None)")

    first = torch.cat([latent(k, 0) for k in range(num)])
    images = synthesize(G, first)
    out: list[Candidate] = []
    for k in range(num):
        ws, img, draw, history = first[k:k + 1], images[k], 0, []
        while True:
            if not guard:
                dist, status = None, "unchecked"
                break
            dist, status = identity_check(recognizer, img, target_desc, guard_threshold)
            if status != "too close":
                break
            if draw >= max_redraws:
                status = "rejected"
                break
            history.append(dist)
            draw += 1
            ws = latent(k, draw)
            img = synthesize(G, ws)[0]
        out.append(Candidate(index=k, image=img, ws=ws.clone(), distance=dist, status=status, draws=draw + 1,
                             history=history))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Grid


def _label(c: Candidate) -> str:
    if c.status == "no face":
        return f"{c.index} no face"
    if c.distance is None:
        return f"{c.index}"
    mark = "" if c.status == "ok" else " !"
    return f"{c.index} d={c.distance:.2f}{mark}"


def candidate_grid(candidates: Sequence[Candidate], cell: int = 256, cols: int = 3) -> np.ndarray:
    """uint8 RGB grid (3x3 for 9 candidates) of the candidates, each labelled with its index and its distance to
    the target ("no face" when none was found, "!" when the guard rejected it)."""
    if not candidates:
        raise KeeprError("no candidates to show")
    rows = (len(candidates) + cols - 1) // cols
    grid = np.zeros((rows * cell, cols * cell, 3), np.uint8)
    scale = cell / 256.0
    for i, c in enumerate(candidates):
        r, q = divmod(i, cols)
        tile = cv2.resize(to_rgb_uint8(c.image), (cell, cell),
                          interpolation=cv2.INTER_AREA if c.image.shape[0] > cell else cv2.INTER_CUBIC)
        text = _label(c)
        org = (int(8 * scale), int(cell - 10 * scale))
        thick = max(1, int(round(2 * scale)))
        cv2.putText(tile, text, org, cv2.FONT_HERSHEY_SIMPLEX, 0.7 * scale, (0, 0, 0), thick + 2, cv2.LINE_AA)
        colour = (255, 255, 255) if c.status in ("ok", "unchecked") else (255, 80, 80)
        cv2.putText(tile, text, org, cv2.FONT_HERSHEY_SIMPLEX, 0.7 * scale, colour, thick, cv2.LINE_AA)
        grid[r * cell:(r + 1) * cell, q * cell:(q + 1) * cell] = tile
    return grid
