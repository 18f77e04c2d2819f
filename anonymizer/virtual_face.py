"""Build the virtual face that replaces one target: align -> encode -> candidates with identity guard -> choose ->
match skin.

The target's best frame (largest, most frontal view of its track) is FFHQ-aligned at ``align_size`` =
max(256, generator resolution): large enough for dlib's identity guard and the skin measurement, and the crop the
co-part source is later cut from (:func:`anonymizer.crop.crop_aligned`). ``anonymizer.candidates`` encodes it, adds
latent noise and synthesises the candidates, redrawing any that dlib judges to be the same person.

Choice: ``candidate`` when given (any status; the report says it), else the first candidate that passed the guard
("ok"), else the first in which dlib finds no face at all (it cannot be matched to the target; this is what the
tiny random test generator produces). If every candidate is still closer than the guard threshold after its
redraws, no virtual face is made (KeeprError): raising the noise or changing the seed is the user's call, silently
using a look-alike would defeat the purpose.

The chosen candidate is resized to ``align_size`` and its skin hue and saturation are moved to the target's
(``anonymizer.skin``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from anonymizer.candidates import candidate_grid, make_candidates
from anonymizer.faces import align_face
from anonymizer.skin import match_skin_tone
from keepr.errors import KeeprError


@dataclass
class VirtualFace:
    """The chosen virtual face in the target's aligned frame and what it took to make it."""

    image: np.ndarray  # uint8 RGB [align_size, align_size, 3], skin-matched
    align_matrix: np.ndarray  # 2x3 best frame -> aligned (at align_size)
    align_size: int
    latent: np.ndarray  # float32 [num_ws, w_dim] of the chosen candidate
    chosen: int
    grid: np.ndarray  # uint8 RGB labelled grid of all candidates
    aligned_target: np.ndarray  # uint8 RGB aligned target (not saved: it is the person's face)
    report: dict = field(default_factory=dict)


def choose_candidate(candidates, candidate: int | None) -> tuple[int, str]:
    """Index of the candidate to use and why (see the module docstring)."""
    if candidate is not None:
        if not 0 <= candidate < len(candidates):
            raise KeeprError(f"--candidate {candidate} out of range: there are {len(candidates)} candidates "
                             f"(0..{len(candidates) - 1})")
        return candidate, "chosen by --candidate"
    for c in candidates:
        if c.status in ("ok", "unchecked"):
            return c.index, "first that passed the identity guard" if c.status == "ok" else "first (guard off)"
    for c in candidates:
        if c.status == "no face":
            return c.index, "first in which dlib finds no face (identity guard could not measure a distance)"
    dists = ", ".join(f"{c.distance:.2f}" for c in candidates if c.distance is not None)
    raise KeeprError(f"identity guard: all {len(candidates)} candidates stay closer than the threshold to the target "
                     f"(distances {dists}); raise --virtual_face.noise or change --seed")


def build_virtual_face(models, best_image: np.ndarray, landmarks: np.ndarray, settings, seed: int = 0) -> VirtualFace:
    """Make the virtual face for one target from its best frame and that frame's 68 landmarks."""

    G = models.G
    align_size = max(256, int(G.img_resolution))
    aligned = align_face(best_image, landmarks, size=align_size)
    layers = settings.layers if isinstance(settings.layers, str) else tuple(settings.layers)
    cands = make_candidates(G, models.encoder, aligned.image, num=settings.num_candidates,
                            noise_scale=settings.noise, layers=layers, seed=seed,
                            guard_threshold=settings.guard_threshold, max_redraws=settings.max_redraws,
                            recognizer=models.recognizer)
    return finish_virtual_face(cands, aligned, align_size, settings, seed)


def finish_virtual_face(cands, aligned, align_size: int, settings, seed: int) -> VirtualFace:
    """From the candidates of one target to its virtual face: choose one (``settings.candidate`` or the policy of
    :func:`choose_candidate`; KeeprError when all are look-alikes), bring it to ``align_size``, match its skin tone to
    the aligned target and write the report. Shared by the video and the (batched) photo paths."""
    layers = settings.layers if isinstance(settings.layers, str) else tuple(settings.layers)
    chosen, why = choose_candidate(cands, settings.candidate)
    c = cands[chosen]
    face = c.image
    if face.shape[0] != align_size:
        face = cv2.resize(face, (align_size, align_size),
                          interpolation=cv2.INTER_CUBIC if face.shape[0] < align_size else cv2.INTER_AREA)
    skin = {"applied": False}
    if settings.skin_match:
        try:
            face, info = match_skin_tone(face, aligned.image, seed=seed, return_info=True)
            skin = {"applied": True, "hue_shift_deg": round(info.hue_shift, 3),
                    "saturation_scale": round(info.saturation_scale, 4),
                    "target_tone": _tone(info.target_tone), "candidate_tone": _tone(info.candidate_tone),
                    "landmarks_detected": {"candidate": info.candidate_detected, "target": info.target_detected}}
        except KeeprError as exc:  # e.g. too few skin pixels to measure a tone: keep the colours, say so
            skin = {"applied": False, "skipped": " ".join(str(exc).split())}
    report = {
        "chosen": chosen,
        "chosen_why": why,
        "seed": seed,
        "align_size": align_size,
        "guard_threshold": settings.guard_threshold,
        "noise": settings.noise,
        "layers": list(layers) if not isinstance(layers, str) else layers,
        "candidates": [{"index": k.index, "distance": None if k.distance is None else round(float(k.distance), 4),
                        "status": k.status, "draws": k.draws} for k in cands],
        "skin_match": skin,
    }
    return VirtualFace(image=np.ascontiguousarray(face), align_matrix=aligned.matrix, align_size=align_size,
                       latent=c.ws[0].float().cpu().numpy(),
                       chosen=chosen, grid=candidate_grid(cands), aligned_target=aligned.image, report=report)


def _tone(t) -> dict:
    return {"hue": round(t.hue, 3), "saturation": round(t.saturation, 4), "value": round(t.value, 4)}


def save_virtual_face(vf: VirtualFace, out_dir: Path, suffix: str = "") -> dict:
    """Write candidates{suffix}.png (labelled grid), latent{suffix}.npy (chosen ws) and virtual_face{suffix}.png;
    returns the file names."""

    out_dir = Path(out_dir)
    files = {"candidates": f"candidates{suffix}.png", "latent": f"latent{suffix}.npy",
             "virtual_face": f"virtual_face{suffix}.png"}
    Image.fromarray(vf.grid).save(out_dir / files["candidates"])
    np.save(out_dir / files["latent"], vf.latent.astype(np.float32))
    Image.fromarray(vf.image).save(out_dir / files["virtual_face"])
    return files
