"""Skin colour matching: give the chosen virtual face the skin tone of the person it replaces.

1. Skin mask from the 68 landmarks: the face region (jaw line up to a band of forehead above the brows) minus eyes,
   brows and mouth, intersected with a plausible-skin colour test (YCrCb box of Chai & Ngan) and feathered at
   its edge.
2. Dominant skin tone: K-means (scikit-learn, fixed seed) on the HSV skin pixels, clustered in the chroma plane of
   the HSV cone (S cos H, S sin H) so that hue is treated as an angle; the largest cluster is the skin tone, with the
   circular mean of its hues and the mean of its saturations.
3. Transfer: inside the mask, the candidate's hue is rotated by the (shortest, signed) angle from its tone to the
   target's and its saturation scaled by the ratio of the two; the value channel, which carries shading, is never
   touched. The arithmetic is done in float HSV (hue in degrees [0, 360), S and V in [0, 1]) so that hue wraps
   around red (350 deg + 20 deg = 10 deg) instead of jumping across the circle.

Only H and S change, and only where the feathered mask is above zero: V (= max(R, G, B)) is unchanged up to
rounding and every pixel outside the mask is bit-identical to the input.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from anonymizer import landmarks as L
from anonymizer.faces import aligned_face_landmarks
from keepr.errors import KeeprError
from keepr.images import to_rgb_uint8

__all__ = [
    "SkinTone", "rgb_to_hsv", "hsv_to_rgb", "skin_region_mask", "plausible_skin", "skin_mask",
    "dominant_skin_tone", "hue_difference", "transfer_tone", "match_skin_tone", "MatchInfo",
]

MIN_SKIN_FRACTION = 0.25  # below this share of the face region passing the colour test, the test is skipped


@dataclass(frozen=True)
class SkinTone:
    """Dominant skin colour: hue in degrees [0, 360), saturation and value in [0, 1], the share of skin pixels in
    the dominant cluster and the number of skin pixels measured."""

    hue: float
    saturation: float
    value: float
    fraction: float
    num_pixels: int


@dataclass(frozen=True)
class MatchInfo:
    """What :func:`match_skin_tone` did: tones before/after, the feathered mask used on the candidate, and
    whether the landmarks came from a detection (False: canonical FFHQ box was used)."""

    candidate_tone: SkinTone
    target_tone: SkinTone
    mask: np.ndarray
    hue_shift: float
    saturation_scale: float
    candidate_detected: bool
    target_detected: bool


# ----------------------------------------------------------------------------------------------------------------
# Colour space


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB -> float32 HSV with H in degrees [0, 360), S and V in [0, 1]."""
    hsv = cv2.cvtColor(rgb.astype(np.float32) / 255.0, cv2.COLOR_RGB2HSV)
    hsv[..., 0] = np.mod(hsv[..., 0], 360.0)
    return hsv


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """float32 HSV (H degrees, S and V in [0, 1]) -> uint8 RGB, with S and V clamped and H wrapped."""
    h = np.mod(hsv[..., 0], 360.0)
    s = np.clip(hsv[..., 1], 0.0, 1.0)
    v = np.clip(hsv[..., 2], 0.0, 1.0)
    rgb = cv2.cvtColor(np.stack([h, s, v], axis=-1).astype(np.float32), cv2.COLOR_HSV2RGB)
    return np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)


def hue_difference(to_deg: float | np.ndarray, from_deg: float | np.ndarray) -> float | np.ndarray:
    """Signed shortest rotation (degrees, in [-180, 180)) taking hue ``from_deg`` to ``to_deg``."""
    return np.mod(np.asarray(to_deg, dtype=np.float64) - from_deg + 180.0, 360.0) - 180.0


# ----------------------------------------------------------------------------------------------------------------
# Masks


def skin_region_mask(shape: tuple[int, int], landmarks: np.ndarray, forehead: float = 0.25) -> np.ndarray:
    """uint8 {0,1} mask of the face region from 68 landmarks, minus eyes, brows and mouth.

    The region is the hull of the jaw line and the brows lifted by ``forehead`` times the brow-to-chin distance
    (a band of forehead); eyes, brows and mouth are cut out with a margin proportional to the face size.
    """
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.shape != (68, 2):
        raise KeeprError(f"expected 68x2 landmarks, got shape {lm.shape}")
    h, w = shape[:2]
    brows = lm[L.BROWS]
    chin = lm[L.CHIN]
    up = brows.mean(axis=0) - chin
    lifted = brows + forehead * up
    region = np.zeros((h, w), np.uint8)
    hull = cv2.convexHull(np.round(np.concatenate([lm[L.JAW], lifted])).astype(np.int32))
    cv2.fillConvexPoly(region, hull, 1)
    face_size = max(np.hypot(*up), 1.0)
    margin = max(1, int(round(0.03 * face_size)))
    holes = np.zeros((h, w), np.uint8)
    for sl in (L.EYE_RIGHT, L.EYE_LEFT, L.MOUTH_OUTER):
        cv2.fillConvexPoly(holes, cv2.convexHull(np.round(lm[sl]).astype(np.int32)), 1)
    for sl in (L.BROW_RIGHT, L.BROW_LEFT):
        cv2.polylines(holes, [np.round(lm[sl]).astype(np.int32)], False, 1, thickness=max(2, 2 * margin))
    holes = cv2.dilate(holes, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * margin + 1, 2 * margin + 1)))
    return (region & (1 - holes)).astype(np.uint8)


def plausible_skin(rgb: np.ndarray) -> np.ndarray:
    """bool mask of pixels whose colour can be skin: Cr in [133, 173] and Cb in [77, 127] (Chai & Ngan 1999), not
    near-black and not blown-out (their hue is meaningless)."""
    ycrcb = cv2.cvtColor(rgb, cv2.COLOR_RGB2YCrCb)
    cr, cb = ycrcb[..., 1], ycrcb[..., 2]
    v = rgb.max(axis=2)
    return (cr >= 133) & (cr <= 173) & (cb >= 77) & (cb <= 127) & (v >= 30) & (rgb.min(axis=2) <= 250)


def skin_mask(rgb: np.ndarray, landmarks: np.ndarray, feather: float = 0.02, colour_test: bool = True) -> np.ndarray:
    """Feathered float32 [H,W] skin mask in [0, 1] of a face image.

    The landmark region is intersected with :func:`plausible_skin` (skipped when ``colour_test`` is False or
    when less than ``MIN_SKIN_FRACTION`` of the region passes, e.g. for a strongly tinted generated face),
    cleaned with a small opening/closing, then feathered outwards: the mask is 1 on the skin pixels and falls to 0
    over about ``2 * feather`` times the image side around them (a Gaussian blur doubled and clipped), so skin is
    changed fully and the edge has no seam. Values below 1/255 are set to exactly 0, so "outside the mask" is
    well defined.
    """
    rgb = to_rgb_uint8(rgb)
    region = skin_region_mask(rgb.shape[:2], landmarks)
    mask = region
    if colour_test and region.any():
        skin = region & plausible_skin(rgb).astype(np.uint8)
        if skin.sum() >= MIN_SKIN_FRACTION * region.sum():
            mask = skin
    k = max(3, int(round(0.01 * max(rgb.shape[:2]))) | 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel)
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel) & region
    sigma = max(0.5, feather * max(rgb.shape[:2]))
    soft = 2.0 * cv2.GaussianBlur(mask.astype(np.float32), (0, 0), sigmaX=sigma, sigmaY=sigma)
    soft[soft < 1.0 / 255.0] = 0.0
    return np.clip(soft, 0.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Tone


def dominant_skin_tone(rgb: np.ndarray, mask: np.ndarray | None = None, landmarks: np.ndarray | None = None,
                       n_clusters: int = 3, seed: int = 0, max_pixels: int = 4000,
                       threshold: float = 0.999) -> SkinTone:
    """Dominant skin tone of an aligned face crop by K-means in the HSV cone.

    Pixels are those with ``mask >= threshold`` (by default the fully-weighted core of :func:`skin_mask`); the mask is
    computed from ``landmarks`` (found on the crop when
    not given) when not supplied. At most ``max_pixels`` pixels are clustered (a fixed-seed subsample), so the
    result is deterministic.
    """
    from sklearn.cluster import KMeans  # heavy (sklearn): only in dominant_skin_tone()
    from threadpoolctl import threadpool_limits  # heavy (threadpoolctl): only in dominant_skin_tone()

    rgb = to_rgb_uint8(rgb)
    if mask is None:
        if landmarks is None:
            landmarks, _ = aligned_face_landmarks(rgb)
        mask = skin_mask(rgb, landmarks)
    sel = np.asarray(mask) >= threshold
    n = int(sel.sum())
    if n < max(n_clusters, 10):
        raise KeeprError(f"too few skin pixels ({n}) to measure a skin tone")
    hsv = rgb_to_hsv(rgb)[sel].astype(np.float64)
    if n > max_pixels:
        idx = np.sort(np.random.default_rng(seed).choice(n, size=max_pixels, replace=False))
        hsv = hsv[idx]
    rad = np.deg2rad(hsv[:, 0])
    # Chroma plane of the HSV cone: hue as an angle, saturation as the radius. V (shading) is left out so that the
    # clustering commutes with the transfer (a rotation and scaling of this plane): the tone measured after
    # matching is the one that was asked for.
    feats = np.stack([hsv[:, 1] * np.cos(rad), hsv[:, 1] * np.sin(rad)], axis=1)
    k = min(n_clusters, len(np.unique(feats, axis=0)))
    if k > 1:
        # A few thousand 2-D points: one thread is far faster than OpenMP's start-up on a busy machine.
        with threadpool_limits(limits=1):
            labels = KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(feats)
    else:
        labels = np.zeros(len(feats), int)
    counts = np.bincount(labels, minlength=k)
    top = int(np.argmax(counts))
    members = hsv[labels == top]
    mr = np.deg2rad(members[:, 0])
    hue = float(np.mod(np.rad2deg(np.arctan2(np.sin(mr).mean(), np.cos(mr).mean())), 360.0))
    return SkinTone(hue=hue, saturation=float(members[:, 1].mean()), value=float(members[:, 2].mean()),
                    fraction=float(counts[top] / len(labels)), num_pixels=n)


def transfer_tone(rgb: np.ndarray, mask: np.ndarray, source: SkinTone,
                  target: SkinTone) -> tuple[np.ndarray, float, float]:
    """Move hue and saturation of ``rgb`` from tone ``source`` to tone ``target`` where ``mask`` > 0.

    Hue is rotated by the shortest signed angle, saturation scaled by target/source (clamped to [0, 1]); both are
    applied in proportion to the mask value. V is kept. Returns (new uint8 RGB, hue shift in degrees, saturation
    scale). Pixels with mask == 0 are copied unchanged.
    """
    rgb = to_rgb_uint8(rgb)
    alpha = np.clip(np.asarray(mask, dtype=np.float32), 0.0, 1.0)
    if alpha.shape != rgb.shape[:2]:
        raise KeeprError(f"mask shape {alpha.shape} does not match the image {rgb.shape[:2]}")
    shift = float(hue_difference(target.hue, source.hue))
    scale = float(target.saturation / max(source.saturation, 1e-6))
    out = rgb.copy()
    sel = alpha > 0
    if not sel.any():
        return out, shift, scale
    hsv = rgb_to_hsv(rgb)[sel]
    a = alpha[sel]
    hsv[:, 0] = np.mod(hsv[:, 0] + a * shift, 360.0)
    hsv[:, 1] = np.clip(hsv[:, 1] * (1.0 + a * (scale - 1.0)), 0.0, 1.0)
    out[sel] = hsv_to_rgb(hsv[None])[0]
    return out, shift, scale


def match_skin_tone(candidate_rgb: np.ndarray, target_rgb: np.ndarray, n_clusters: int = 3, seed: int = 0,
                    feather: float = 0.02, return_info: bool = False):
    """Give an aligned candidate face the target's dominant skin hue and saturation, keeping its shading.

    candidate_rgb, target_rgb: aligned uint8 RGB face crops of the same size (e.g. both from
    :func:`anonymizer.faces.align_face` at 256). Landmarks are found on each crop (falling back to the canonical
    FFHQ face box when the detector misses, e.g. on a generated face). Returns the new uint8 RGB crop, or
    (crop, :class:`MatchInfo`) with ``return_info``.
    """
    cand = to_rgb_uint8(candidate_rgb, "candidate")
    targ = to_rgb_uint8(target_rgb, "target")
    if cand.shape != targ.shape:
        raise KeeprError(f"candidate {cand.shape} and target {targ.shape} crops must have the same size; "
                         "align both to the same resolution first")
    lm_c, det_c = aligned_face_landmarks(cand)
    lm_t, det_t = aligned_face_landmarks(targ)
    mask_c = skin_mask(cand, lm_c, feather)
    mask_t = skin_mask(targ, lm_t, feather)
    tone_c = dominant_skin_tone(cand, mask_c, n_clusters=n_clusters, seed=seed)
    tone_t = dominant_skin_tone(targ, mask_t, n_clusters=n_clusters, seed=seed)
    out, shift, scale = transfer_tone(cand, mask_c, tone_c, tone_t)
    if not return_info:
        return out
    return out, MatchInfo(candidate_tone=tone_c, target_tone=tone_t, mask=mask_c, hue_shift=shift,
                          saturation_scale=scale, candidate_detected=det_c, target_detected=det_t)
