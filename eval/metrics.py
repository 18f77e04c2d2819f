"""Identity-leakage and realism metrics on dlib 128-d face descriptors and 68-point landmarks.

The metrics are torchmetrics ``Metric`` classes fed with per-frame arrays (descriptors, landmarks, detection flags),
so the same code scores videos, photos and any anonymization method. Missing measurements (no face found) are NaN
rows and are counted, never replaced by a made-up value.

Conventions:

- Descriptor distance is Euclidean, as in dlib; ``SAME_PERSON_THRESHOLD`` (0.6) is dlib's own threshold, 0.5 a stricter
  one. A frame *leaks* when the anonymized face's descriptor is within the threshold of the original's. A frame whose
  anonymized face cannot be described counts as not leaking (the attack found nothing to compare).
- Landmark error is the mean point-to-point distance over the 68 landmarks divided by the original's outer inter-ocular
  distance (points 36 and 45), i.e. the usual normalised mean error (NME).
- Head pose comes from ``cv2.solvePnP`` with a generic 3-D face model (6 landmarks) and a pinhole camera whose focal
  length is the image width; angles are (yaw, pitch, roll) in degrees.
"""
from __future__ import annotations

import math
from typing import Sequence

import cv2
import numpy as np
import torch
from scipy import linalg
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from anonymizer.faces import Face, detect_faces, landmarks_for_box
from anonymizer.identity import FaceRecognizer
from anonymizer.tracking import iou as box_iou

SAME_PERSON_THRESHOLD = 0.6  # dlib's threshold for "same person" on its 128-d descriptor
STRICT_THRESHOLD = 0.5  # a stricter operating point, also reported
DESCRIPTOR_DIM = 128

# Generic 3-D face model (millimetre-like units, x right, y up, z towards the camera) and the 68-point indices it
# corresponds to: nose tip, chin, outer left eye corner, outer right eye corner, left and right mouth corners.
GENERIC_FACE_3D = np.array(
    [
        [0.0, 0.0, 0.0],
        [0.0, -330.0, -65.0],
        [-225.0, 170.0, -135.0],
        [225.0, 170.0, -135.0],
        [-150.0, -150.0, -125.0],
        [150.0, -150.0, -125.0],
    ],
    dtype=np.float64,
)
GENERIC_FACE_LANDMARKS = (30, 8, 36, 45, 48, 54)


# ----------------------------------------------------------------------------------------------------------------
# Plain functions.


def descriptor_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Euclidean distance between two [N,128] descriptor arrays (NaN where either row is NaN)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"descriptor arrays must have the same [N,D] shape, got {a.shape} and {b.shape}")
    return np.sqrt(((a - b) ** 2).sum(axis=1))


def frechet_distance(real: np.ndarray, fake: np.ndarray, eps: float = 1e-6) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N,D] and [M,D] (the FID formula).

    Rows with NaN are dropped; with fewer than 2 rows on either side the result is NaN.
    """
    real = np.asarray(real, dtype=np.float64)
    fake = np.asarray(fake, dtype=np.float64)
    real = real[~np.isnan(real).any(axis=1)]
    fake = fake[~np.isnan(fake).any(axis=1)]
    if len(real) < 2 or len(fake) < 2:
        return float("nan")
    mu1, mu2 = real.mean(0), fake.mean(0)
    s1, s2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    if not np.isfinite(covmean).all():
        # Near-singular product (few samples): regularise both covariances slightly, as is customary for FID.
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    covmean = np.real(covmean)
    diff = mu1 - mu2
    # Clamp round-off below zero (identical sets give -1e-9 and the like).
    return max(0.0, float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean)))


def landmark_nme(original: np.ndarray, other: np.ndarray) -> float:
    """Mean 68-landmark distance normalised by the original's outer inter-ocular distance (NaN if either is missing)."""
    original = np.asarray(original, dtype=np.float64)
    other = np.asarray(other, dtype=np.float64)
    if original.shape != (68, 2) or other.shape != (68, 2):
        raise ValueError(f"landmarks must be [68,2], got {original.shape} and {other.shape}")
    if np.isnan(original).any() or np.isnan(other).any():
        return float("nan")
    iod = float(np.linalg.norm(original[45] - original[36]))
    if iod <= 0:
        return float("nan")
    return float(np.linalg.norm(original - other, axis=1).mean() / iod)


def head_pose(landmarks: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """(yaw, pitch, roll) in degrees from 68 landmarks with a generic 3-D face model; NaN when unsolvable.

    ``image_size`` is (height, width) of the frame the landmarks are in.
    """
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if landmarks.shape != (68, 2) or np.isnan(landmarks).any():
        return np.full(3, np.nan)
    h, w = image_size
    focal = float(w)
    camera = np.array([[focal, 0, w / 2.0], [0, focal, h / 2.0], [0, 0, 1]], dtype=np.float64)
    image_points = landmarks[list(GENERIC_FACE_LANDMARKS)].reshape(-1, 1, 2)
    ok, rvec, _tvec = cv2.solvePnP(
        GENERIC_FACE_3D, image_points, camera, np.zeros(4), flags=cv2.SOLVEPNP_ITERATIVE
    )
    if not ok:
        return np.full(3, np.nan)
    rot, _ = cv2.Rodrigues(rvec)
    # The model's y axis points up and z towards the camera, the image's y down and z away: flip both to get the
    # head's rotation in the model's own frame, then read intrinsic angles (yaw about y, pitch about x, roll about z).
    flip = np.diag([1.0, -1.0, -1.0])
    r = flip @ rot
    pitch = math.degrees(math.atan2(r[2, 1], r[2, 2]))
    yaw = math.degrees(math.asin(max(-1.0, min(1.0, -r[2, 0]))))
    roll = math.degrees(math.atan2(r[1, 0], r[0, 0]))
    return np.array([yaw, pitch, roll])


def _as_tensor(x, dtype=torch.float64) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------
# torchmetrics Metrics.


class IdentityLeakage(Metric):
    """Per-frame identity distance between anonymized and original faces, and the match (leak) rates.

    ``update(original [N,128], anonymized [N,128])``: a NaN row in ``original`` means the frame has no reference face
    and is skipped; a NaN row in ``anonymized`` means no descriptor could be computed there (counted, not a leak).
    """

    full_state_update = False

    def __init__(self, thresholds: Sequence[float] = (SAME_PERSON_THRESHOLD, STRICT_THRESHOLD), **kwargs):
        super().__init__(**{"sync_on_compute": False, **kwargs})  # a clip's metric is that clip's, on any rank
        self.thresholds = tuple(float(t) for t in thresholds)
        self.add_state("distances", default=[], dist_reduce_fx="cat")  # NaN where the anonymized face is missing

    def update(self, original, anonymized) -> None:
        original, anonymized = _as_tensor(original), _as_tensor(anonymized)
        if original.shape != anonymized.shape or original.ndim != 2 or original.shape[1] != DESCRIPTOR_DIM:
            raise ValueError(f"expected two [N,{DESCRIPTOR_DIM}] arrays, "
                             f"got {tuple(original.shape)}, {tuple(anonymized.shape)}")
        keep = ~torch.isnan(original).any(dim=1)
        d = torch.linalg.vector_norm(original[keep] - anonymized[keep], dim=1)
        self.distances.append(d)

    def compute(self) -> dict[str, float]:
        d = dim_zero_cat(self.distances) if self.distances else torch.zeros(0, dtype=torch.float64)
        found = d[~torch.isnan(d)]
        out = {
            "frames": int(d.numel()),
            "frames_described": int(found.numel()),
            "identity_distance_mean": float(found.mean()) if found.numel() else float("nan"),
            "identity_distance_std": float(found.std(unbiased=False)) if found.numel() else float("nan"),
        }
        for t in self.thresholds:
            # NaN < t is False: an indescribable face does not leak.
            out[f"match_rate@{t:g}"] = float((d < t).double().mean()) if d.numel() else float("nan")
        return out


class ReIdentification(Metric):
    """Top-1 re-identification: is the nearest gallery descriptor the probe's own identity?

    The gallery is fixed at construction (``gallery`` [G,128], ``labels`` G strings). ``update(probes [N,128],
    labels)`` with each probe's true identity (which must occur in the gallery). A probe without a descriptor (NaN)
    is a miss. ``compute`` gives the top-1 rate and the rate of top-1 hits that are also within ``threshold``.
    """

    full_state_update = False

    def __init__(self, gallery, labels: Sequence[str], threshold: float = SAME_PERSON_THRESHOLD, **kwargs):
        super().__init__(**{"sync_on_compute": False, **kwargs})  # a clip's metric is that clip's, on any rank
        gallery = np.asarray(gallery, dtype=np.float64)
        if gallery.ndim != 2 or gallery.shape[1] != DESCRIPTOR_DIM or len(gallery) != len(labels) or len(labels) == 0:
            raise ValueError(f"gallery must be [G,{DESCRIPTOR_DIM}] with G labels, "
                             f"got {gallery.shape} and {len(labels)}")
        self.label_names = list(labels)
        self._index = {name: i for i, name in enumerate(sorted(set(self.label_names)))}
        self.register_buffer("gallery", torch.as_tensor(gallery))
        self.register_buffer("gallery_ids", torch.tensor([self._index[n] for n in self.label_names]))
        self.threshold = float(threshold)
        self.add_state("hits", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("hits_within", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def nearest(self, probes) -> tuple[list[str | None], np.ndarray]:
        """Nearest gallery identity and distance per probe (None / NaN for a NaN probe)."""
        p = _as_tensor(probes).reshape(-1, DESCRIPTOR_DIM)
        d = torch.cdist(p, self.gallery)
        dmin, idx = d.min(dim=1)
        names = [None if torch.isnan(dmin[i]) else self.label_names[int(idx[i])] for i in range(len(p))]
        return names, dmin.numpy()

    def update(self, probes, labels: Sequence[str]) -> None:
        names, dmin = self.nearest(probes)
        if len(labels) != len(names):
            raise ValueError(f"{len(names)} probes but {len(labels)} labels")
        for true, got, dist in zip(labels, names, dmin):
            if true not in self._index:
                raise ValueError(f"probe identity {true!r} is not in the gallery")
            hit = got == true
            self.hits += int(hit)
            self.hits_within += int(hit and dist < self.threshold)
            self.total += 1

    def compute(self) -> dict[str, float]:
        n = int(self.total)
        return {
            "reid_probes": n,
            "reid_top1": float(self.hits) / n if n else float("nan"),
            f"reid_top1_within@{self.threshold:g}": float(self.hits_within) / n if n else float("nan"),
        }


class DetectionRate(Metric):
    """Fraction of frames in which the face detector finds the (anonymized) face."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**{"sync_on_compute": False, **kwargs})  # a clip's metric is that clip's, on any rank
        self.add_state("found", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, detected) -> None:
        detected = torch.as_tensor(np.asarray(detected, dtype=bool))
        self.found += int(detected.sum())
        self.total += int(detected.numel())

    def compute(self) -> dict[str, float]:
        n = int(self.total)
        return {"detection_rate": float(self.found) / n if n else float("nan")}


class DescriptorFrechetDistance(Metric):
    """Frechet distance between the dlib descriptor sets of real and anonymized faces (NaN rows dropped)."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**{"sync_on_compute": False, **kwargs})  # a clip's metric is that clip's, on any rank
        self.add_state("real", default=[], dist_reduce_fx="cat")
        self.add_state("fake", default=[], dist_reduce_fx="cat")

    def update(self, real, fake) -> None:
        self.real.append(_as_tensor(real).reshape(-1, DESCRIPTOR_DIM))
        self.fake.append(_as_tensor(fake).reshape(-1, DESCRIPTOR_DIM))

    def compute(self) -> dict[str, float]:
        real = dim_zero_cat(self.real).numpy() if self.real else np.zeros((0, DESCRIPTOR_DIM))
        fake = dim_zero_cat(self.fake).numpy() if self.fake else np.zeros((0, DESCRIPTOR_DIM))
        return {"descriptor_frechet": frechet_distance(real, fake)}


class LandmarkPoseError(Metric):
    """Expression and pose preservation: landmark NME and absolute yaw/pitch/roll difference to the original.

    ``update(original [N,68,2], anonymized [N,68,2], image_size=(H, W))``; frames where either is NaN (no face found)
    are left out of the means and counted in ``pose_frames`` only when measurable.
    """

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**{"sync_on_compute": False, **kwargs})  # a clip's metric is that clip's, on any rank
        self.add_state("nme", default=[], dist_reduce_fx="cat")
        self.add_state("pose_error", default=[], dist_reduce_fx="cat")

    def update(self, original, anonymized, image_size: tuple[int, int]) -> None:
        original = np.asarray(original, dtype=np.float64).reshape(-1, 68, 2)
        anonymized = np.asarray(anonymized, dtype=np.float64).reshape(-1, 68, 2)
        if len(original) != len(anonymized):
            raise ValueError(f"{len(original)} original but {len(anonymized)} anonymized landmark sets")
        nme = [landmark_nme(o, a) for o, a in zip(original, anonymized)]
        pose = [np.abs(head_pose(a, image_size) - head_pose(o, image_size)) for o, a in zip(original, anonymized)]
        self.nme.append(_as_tensor(nme).reshape(-1))
        self.pose_error.append(_as_tensor(np.array(pose)).reshape(-1, 3))

    def compute(self) -> dict[str, float]:
        nme = dim_zero_cat(self.nme).numpy() if self.nme else np.zeros(0)
        pose = dim_zero_cat(self.pose_error).numpy() if self.pose_error else np.zeros((0, 3))
        nme = nme[~np.isnan(nme)]
        pose = pose[~np.isnan(pose).any(axis=1)]
        out = {"landmark_nme": float(nme.mean()) if len(nme) else float("nan"), "pose_frames": int(len(pose))}
        for i, name in enumerate(("yaw", "pitch", "roll")):
            out[f"{name}_error_deg"] = float(pose[:, i].mean()) if len(pose) else float("nan")
        return out


# ----------------------------------------------------------------------------------------------------------------
# Measuring one face in one frame.


class FaceMeasurement:
    """What the attacker and the realism metrics see of one face in one frame.

    detected:   the HOG detector finds a face overlapping the reference box (IoU >= ``min_iou``).
    landmarks:  [68,2] of the detected face (NaN when not detected).
    descriptor: [128] identity descriptor, NaN when none could be computed. The attack is the stronger one that knows
                where the face is: it uses the detected face, and when the detector misses it, the 68-point
                shape predictor run inside the reference box ("located" descriptor).
    located:    True when the descriptor came from the reference box rather than a detection.
    """

    __slots__ = ("detected", "landmarks", "descriptor", "located", "box")

    def __init__(self, detected, landmarks, descriptor, located, box):
        self.detected = bool(detected)
        self.landmarks = landmarks
        self.descriptor = descriptor
        self.located = bool(located)
        self.box = box

    @classmethod
    def missing(cls) -> "FaceMeasurement":
        """Nothing measured (no reference box in this frame)."""
        return cls(False, _nan_landmarks(), _nan_descriptor(), False, None)


def _nan_landmarks() -> np.ndarray:
    return np.full((68, 2), np.nan)


def _nan_descriptor() -> np.ndarray:
    return np.full(DESCRIPTOR_DIM, np.nan)


class FaceMeasurer:
    """Detects, landmarks and describes the face at a reference box (or the largest face) with dlib.

    upsample: HOG upsampling steps (1 finds faces down to ~40 px). search_margin: detection runs on the reference
    box grown by this fraction of its size on each side (faster than the full frame, and other people's faces
    are not confused with the target). min_iou: overlap a detection needs with the reference box to count.
    """

    def __init__(self, upsample: int = 1, search_margin: float = 0.6, min_iou: float = 0.3, recognizer=None):
        self.upsample = upsample  # HOG upsampling steps
        self.search_margin = search_margin  # detection window around the reference box, fraction of its size
        self.min_iou = min_iou  # IoU a detection needs with the reference box
        self.recognizer = recognizer or FaceRecognizer(detector="hog", upsample=upsample)

    def detect(self, rgb: np.ndarray, box: Sequence[float] | None):
        """The detected face matching ``box`` (best IoU) or, without a box, the largest face; None if none."""

        if box is None:
            faces = detect_faces(rgb, "hog", self.upsample)
            return faces[0] if faces else None
        h, w = rgb.shape[:2]
        x0, y0, x1, y1 = box
        mx, my = (x1 - x0) * self.search_margin, (y1 - y0) * self.search_margin
        xa, ya = max(0, int(x0 - mx)), max(0, int(y0 - my))
        xb, yb = min(w, int(np.ceil(x1 + mx))), min(h, int(np.ceil(y1 + my)))
        faces = detect_faces(rgb[ya:yb, xa:xb], "hog", self.upsample) if xb > xa and yb > ya else []
        best, best_iou = None, self.min_iou
        for f in faces:
            shifted = tuple(v + o for v, o in zip(f.box, (xa, ya, xa, ya)))
            iou = box_iou(shifted, box)
            if iou >= best_iou:
                best, best_iou = f, iou
        if best is None:
            return None
        off = np.array([xa, ya], dtype=np.float64)
        raw = best.detector_box or best.box
        return Face(
            box=tuple(int(v) for v in (best.box[0] + xa, best.box[1] + ya, best.box[2] + xa, best.box[3] + ya)),
            landmarks=best.landmarks + off,
            score=best.score,
            detector_box=tuple(int(v) for v in (raw[0] + xa, raw[1] + ya, raw[2] + xa, raw[3] + ya)),
        )

    def measure(self, rgb: np.ndarray, box: Sequence[float] | None = None) -> FaceMeasurement:
        face = self.detect(rgb, box)
        if face is not None:
            return FaceMeasurement(True, np.asarray(face.landmarks, np.float64), self.recognizer.descriptor(rgb, face),
                                   False, face.box)
        if box is None:
            return FaceMeasurement.missing()
        ibox = tuple(int(round(v)) for v in box)
        located = Face(box=ibox, landmarks=landmarks_for_box(rgb, ibox), score=float("nan"), detector_box=ibox)
        return FaceMeasurement(False, _nan_landmarks(), self.recognizer.descriptor(rgb, located), True, ibox)
