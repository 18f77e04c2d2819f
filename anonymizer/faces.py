"""Face detection, 68 landmarks and FFHQ-style alignment (with the inverse transform for pasting back).

Detection uses dlib: the HOG + linear SVM frontal detector by default, or the MMOD CNN detector
(``detector="cnn"``, slower on CPU, better on rotated and small faces). Landmarks come from dlib's 68-point shape
predictor shipped in the ``face-recognition-models`` package; nothing is downloaded at run time.

Minimum face size: dlib's HOG detector scans an 80x80 px window, so without upsampling (``upsample=0``) faces smaller
than about 80 px (box side) are missed; each upsampling step halves that (``upsample=1``, the default, finds faces
down to about 40 px, ``upsample=2`` about 20 px) at roughly 4x the cost per step. The CNN detector's window is also
about 80 px. ``min_size`` drops detections smaller than a given box side, because an aligned crop made from a very
small face is mostly interpolation.

Alignment follows the FFHQ recipe (Karras et al., ffhq-dataset): an oriented square is built from the eye-to-eye and
eye-to-mouth vectors of the landmarks and mapped onto the output square by one affine transform. The 2x3 matrix
(image -> aligned) and its inverse are kept so that an aligned crop can be warped back into its frame
(:func:`anonymizer.blend.paste`). The transform is a pure function of the landmarks, so aligning the same photo twice is
bit-identical.

Coordinates are pixel centres: pixel (i, j) covers [j-0.5, j+0.5] x [i-0.5, i+0.5]; points are (x, y).
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from anonymizer import landmarks as L
from anonymizer.geometry import invert_affine
from keepr.errors import KeeprError
from keepr.images import to_rgb_uint8

__all__ = [
    "Face", "AlignedFace", "model_path", "detect_faces", "landmarks_for_box", "select_faces", "find_face",
    "ffhq_quad", "align_face", "aligned_face_landmarks", "MIN_FACE_HOG_PX",
]

MIN_FACE_HOG_PX = 80  # side of dlib's HOG detection window at upsample=0 (halved per upsampling step)

_MODEL_FILES = {
    "landmarks68": "shape_predictor_68_face_landmarks.dat",
    "landmarks5": "shape_predictor_5_face_landmarks.dat",
    "cnn_detector": "mmod_human_face_detector.dat",
    "recognition": "dlib_face_recognition_resnet_model_v1.dat",
}


def model_path(name: str) -> str:
    """Path of a dlib model file shipped in ``face-recognition-models`` ('landmarks68', 'cnn_detector', ...).

    The package's own accessors import ``pkg_resources``, which recent setuptools no longer ships, so the file is
    located from the package directory instead.
    """
    if name not in _MODEL_FILES:
        raise KeyError(f"unknown dlib model {name!r}; known: {sorted(_MODEL_FILES)}")
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise KeeprError("face_recognition_models is not installed; pip install face_recognition_models "
                         "(it ships dlib's landmark, CNN detector and recognition models)")
    for root in spec.submodule_search_locations:
        path = Path(root) / "models" / _MODEL_FILES[name]
        if path.is_file():
            return str(path)
    raise KeeprError(f"{_MODEL_FILES[name]}: not found in the face_recognition_models package; reinstall it")


@functools.lru_cache(maxsize=None)
def _hog_detector():
    import dlib  # heavy (dlib): only in _hog_detector()
    return dlib.get_frontal_face_detector()


@functools.lru_cache(maxsize=None)
def _cnn_detector():
    import dlib  # heavy (dlib): only in _cnn_detector()
    return dlib.cnn_face_detection_model_v1(model_path("cnn_detector"))


@functools.lru_cache(maxsize=None)
def _shape_predictor():
    import dlib  # heavy (dlib): only in _shape_predictor()
    return dlib.shape_predictor(model_path("landmarks68"))


# ----------------------------------------------------------------------------------------------------------------
# Detection


@dataclass(frozen=True, eq=False)
class Face:
    """One detected face: box (x0, y0, x1, y1) in pixels (x1, y1 exclusive, clipped to the image),
    landmarks float [68,2] (x, y), and the detector's confidence score (HOG SVM margin or CNN score)."""

    box: tuple[int, int, int, int]
    landmarks: np.ndarray
    score: float
    detector_box: tuple[int, int, int, int] | None = None  # unclipped dlib rectangle (left, top, right+1, bottom+1)

    @property
    def width(self) -> int:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> int:
        return self.box[3] - self.box[1]

    @property
    def area(self) -> int:
        return self.width * self.height

    @property
    def size(self) -> int:
        """Side of the detector's box (the face scale used by ``min_size``)."""
        b = self.detector_box or self.box
        return int(min(b[2] - b[0], b[3] - b[1]))


def _dlib_rect(box: Sequence[float]):
    import dlib  # heavy (dlib): only in _dlib_rect()
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    return dlib.rectangle(x0, y0, x1 - 1, y1 - 1)


def landmarks_for_box(rgb: np.ndarray, box: Sequence[float]) -> np.ndarray:
    """68 landmarks float [68,2] (x, y) predicted inside ``box`` (x0, y0, x1, y1) of a uint8 RGB image."""
    rgb = to_rgb_uint8(rgb)
    shape = _shape_predictor()(rgb, _dlib_rect(box))
    return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)


def detect_faces(rgb: np.ndarray, detector: str = "hog", upsample: int = 1, min_size: int = 0,
                 max_side: int | None = None) -> list[Face]:
    """Detect faces and their 68 landmarks; returns them sorted largest box first (empty list if none).

    rgb:      image of any size: uint8 RGB, or anything :func:`to_rgb_uint8` accepts (grayscale, RGBA, ...).
    detector: "hog" (default; frontal faces, fast) or "cnn" (dlib MMOD CNN; slower on CPU, more pose-robust).
    upsample: times the image is upsampled by 2 before detection; finds faces down to ~80/2**upsample px.
    min_size: drop faces whose detector box side is below this many pixels (0 keeps all).
    max_side: if given and the image's longer side exceeds it, detect on a downscaled copy (faster on large
              frames); landmarks are still predicted at full resolution.
    """
    rgb = to_rgb_uint8(rgb)
    if detector not in ("hog", "cnn"):
        raise KeeprError(f"unknown face detector {detector!r}; use 'hog' or 'cnn'")
    upsample = int(upsample)
    if upsample < 0:
        raise KeeprError(f"upsample must be >= 0, got {upsample}")
    h, w = rgb.shape[:2]
    scale = 1.0
    det_img = rgb
    if max_side is not None and max(h, w) > max_side:
        scale = max_side / float(max(h, w))
        det_img = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)

    # An image (after upsampling) smaller than half the ~80 px detection window cannot contain a detectable face;
    # dlib's CNN also fails outright on such inputs, so return "no face" for them.
    if min(det_img.shape[:2]) * 2 ** upsample < MIN_FACE_HOG_PX // 2:
        return []
    found: list[tuple[tuple[float, float, float, float], float]] = []
    if detector == "hog":
        rects, scores, _ = _hog_detector().run(det_img, upsample, 0.0)
        for r, s in zip(rects, scores):
            found.append(((r.left(), r.top(), r.right() + 1, r.bottom() + 1), float(s)))
    else:
        try:
            dets = _cnn_detector()(det_img, upsample)
        except RuntimeError as exc:  # dlib reports failures of its DNN as RuntimeError
            msg = " ".join(str(exc).split())[:200]
            raise KeeprError(f"dlib CNN face detector failed on a {w}x{h} image: {msg}") from None
        for d in dets:
            r = d.rect
            found.append(((r.left(), r.top(), r.right() + 1, r.bottom() + 1), float(d.confidence)))

    faces = []
    for (x0, y0, x1, y1), score in found:
        raw = tuple(int(round(v / scale)) for v in (x0, y0, x1, y1))
        if min(raw[2] - raw[0], raw[3] - raw[1]) < max(min_size, 1):
            continue
        lm = landmarks_for_box(rgb, raw)
        box = (max(0, raw[0]), max(0, raw[1]), min(w, raw[2]), min(h, raw[3]))
        if box[2] <= box[0] or box[3] <= box[1]:
            continue
        faces.append(Face(box=box, landmarks=lm, score=score, detector_box=raw))
    # Largest first; ties broken by position so the order is deterministic.
    faces.sort(key=lambda f: (-f.area, f.box[0], f.box[1]))
    return faces


def select_faces(faces: Sequence[Face], which: str | int = "largest", source: str = "image") -> list[Face]:
    """Choose among detected faces: "largest" (default; a one-element list), an index into the largest-first
    order, or "all". Raises KeeprError naming ``source`` when there is no face or the index is out of range."""
    faces = list(faces)
    if not faces:
        raise KeeprError(f"{source}: no face found (dlib detects frontal faces of about 40 px and up at upsample=1; "
                         f"try upsample=2 or detector='cnn')")
    if which == "all":
        return faces
    if which == "largest":
        return faces[:1]
    if isinstance(which, (int, np.integer)) and not isinstance(which, bool):
        if not -len(faces) <= which < len(faces):
            raise KeeprError(f"{source}: face index {which} out of range, {len(faces)} face(s) found")
        return [faces[which]]
    raise KeeprError(f"face selection must be 'largest', 'all' or an integer index, got {which!r}")


def find_face(rgb: np.ndarray, which: str | int = "largest", source: str = "image", **detect_kwargs) -> Face:
    """Detect and return exactly one face (``which`` = "largest" or an index); KeeprError if none."""
    if which == "all":
        raise KeeprError("find_face returns one face; use detect_faces + select_faces(..., 'all') for all faces")
    return select_faces(detect_faces(rgb, **detect_kwargs), which, source)[0]


# ----------------------------------------------------------------------------------------------------------------
# Alignment


@dataclass(frozen=True, eq=False)
class AlignedFace:
    """An aligned face crop and the geometry to go back: ``matrix`` maps image points to crop points (2x3),
    ``inverse`` maps crop points to image points, ``quad`` is the oriented square in the image (4x2: top-left,
    bottom-left, bottom-right, top-right of the crop)."""

    image: np.ndarray
    matrix: np.ndarray
    inverse: np.ndarray
    quad: np.ndarray
    size: int


def ffhq_quad(landmarks: np.ndarray) -> np.ndarray:
    """The FFHQ crop square in image coordinates from 68 landmarks: 4x2 (top-left, bottom-left, bottom-right,
    top-right).

    The square is centred a little below the eyes (eye centre + 0.1 * eye-to-mouth), oriented along the
    eye-to-eye direction corrected by the eye-to-mouth direction, with half-side max(2 * |eye-to-eye|,
    1.8 * |eye-to-mouth|).
    """
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.shape != (68, 2):
        raise KeeprError(f"expected 68x2 landmarks, got shape {lm.shape}")
    eye_r = lm[L.EYE_RIGHT].mean(axis=0)  # image-left eye
    eye_l = lm[L.EYE_LEFT].mean(axis=0)   # image-right eye
    eye_avg = 0.5 * (eye_r + eye_l)
    eye_to_eye = eye_l - eye_r
    mouth = lm[L.MOUTH_OUTER]
    mouth_avg = 0.5 * (mouth[0] + mouth[6])  # mouth corners
    eye_to_mouth = mouth_avg - eye_avg
    # Direction of the crop's x axis: eye-to-eye plus eye-to-mouth rotated by -90 degrees (both point right
    # for an upright face), so tilt is estimated from both.
    x = eye_to_eye + np.array([eye_to_mouth[1], -eye_to_mouth[0]])
    norm = np.hypot(*x)
    if norm < 1e-6:
        raise KeeprError("degenerate landmarks: cannot orient the face")
    x = x / norm * max(2.0 * np.hypot(*eye_to_eye), 1.8 * np.hypot(*eye_to_mouth))
    y = np.array([-x[1], x[0]])  # x rotated by +90 degrees (image y points down)
    c = eye_avg + 0.1 * eye_to_mouth
    return np.stack([c - x - y, c - x + y, c + x + y, c + x - y])


def _quad_matrix(quad: np.ndarray, size: int) -> np.ndarray:
    """Affine 2x3 taking the quad's corners to the outer corners of a size x size crop (pixel-centre coords)."""
    src = np.asarray(quad[:3], dtype=np.float64)
    lo, hi = -0.5, size - 0.5
    dst = np.array([[lo, lo], [lo, hi], [hi, hi]], dtype=np.float64)
    # Solve [x y 1] M^T = dst exactly (3 points define the affine).
    a = np.concatenate([src, np.ones((3, 1))], axis=1)
    return np.linalg.solve(a, dst).T


def align_face(rgb: np.ndarray, landmarks: np.ndarray, size: int = 256, border: str = "reflect") -> AlignedFace:
    """FFHQ-style aligned crop of side ``size`` from an image and its 68 landmarks.

    When the face is much larger than the crop, the image is first shrunk with area averaging (as FFHQ does) to
    avoid aliasing; the returned ``matrix`` always maps original-image coordinates. Parts of the crop outside the
    image are filled by ``border``: "reflect" (FFHQ-like, default) or "constant" (black).
    """
    rgb = to_rgb_uint8(rgb)
    size = int(size)
    if size < 8:
        raise KeeprError(f"aligned size must be at least 8 px, got {size}")
    borders = {"reflect": cv2.BORDER_REFLECT_101, "constant": cv2.BORDER_CONSTANT}
    if border not in borders:
        raise KeeprError(f"unknown border mode {border!r}; use 'reflect' or 'constant'")
    quad = ffhq_quad(landmarks)
    matrix = _quad_matrix(quad, size)
    qsize = float(np.hypot(*(quad[3] - quad[0])))  # side of the square in image pixels
    shrink = int(np.floor(qsize / size * 0.5))
    src = rgb
    warp = matrix
    if shrink > 1:
        h, w = rgb.shape[:2]
        sw, sh = max(1, int(round(w / shrink))), max(1, int(round(h / shrink)))
        src = cv2.resize(rgb, (sw, sh), interpolation=cv2.INTER_AREA)
        # Pixel-centre mapping image -> shrunk image: x' = (x + 0.5) * sw / w - 0.5.
        fx, fy = sw / w, sh / h
        to_small = np.array([[fx, 0, 0.5 * fx - 0.5], [0, fy, 0.5 * fy - 0.5]])
        warp = matrix @ np.vstack([invert_affine(to_small), [0, 0, 1]])
    img = cv2.warpAffine(src, warp, (size, size), flags=cv2.INTER_LINEAR, borderMode=borders[border],
                         borderValue=(0, 0, 0))
    return AlignedFace(image=np.ascontiguousarray(img), matrix=matrix, inverse=invert_affine(matrix), quad=quad,
                       size=size)


# ----------------------------------------------------------------------------------------------------------------
# Landmarks on aligned crops


def canonical_face_box(size: int) -> tuple[int, int, int, int]:
    """Where a face sits in an FFHQ-aligned crop of side ``size`` (the box dlib's HOG detector would give),
    used when detection fails on an aligned crop (e.g. a generated face)."""
    # Measured on the aligned test photos: HOG boxes span about 0.18..0.79 horizontally, 0.25..0.93 vertically.
    return (int(round(0.20 * size)), int(round(0.30 * size)), int(round(0.79 * size)), int(round(0.90 * size)))


def aligned_face_landmarks(crop: np.ndarray, detect: bool = True) -> tuple[np.ndarray, bool]:
    """68 landmarks of an aligned face crop and whether a detector found the face.

    Tries the HOG detector first; when it finds nothing (or ``detect`` is False) the landmarks are predicted
    inside the canonical FFHQ face box, which works because alignment puts every face in the same place.
    """
    crop = to_rgb_uint8(crop, "aligned crop")
    if detect:
        faces = detect_faces(crop, "hog", upsample=1 if crop.shape[0] < 320 else 0)
        if faces:
            return faces[0].landmarks, True
    return landmarks_for_box(crop, canonical_face_box(crop.shape[0])), False
