"""Still-image privacy protocols of the face-anonymization papers: face verification after anonymization.

    python -m eval.protocols verify --pairs data/pairs/london_pairs.txt --root data/gallery/london --layout london \
        --method blur [--arcface weights/model_ir_se50.pth] [--out results/verify_blur]
    python -m eval.protocols verify --pairs lfw/pairs.txt --root lfw/lfw --method mosaic --out results/lfw_mosaic

**Verification** (as in CIAGAN, DeepPrivacy2, FALCO, RiDDLE): the first photo of every pair is anonymized with the
chosen method, a face recogniser compares it with the second (untouched) photo, and the report gives ROC AUC and the
true positive rate at a false positive rate of 1e-3 and 1e-2 over all pairs; the same numbers for the
un-anonymized pairs form the reference row. Lower means less identity leaks.

Pairs file: LFW's ``pairs.txt`` format. An optional first line is a header of one or two integers (``N``:
``pairsDevTrain/Test.txt``, N same-person then N different-person pairs; ``F N``: ``pairs.txt``, F folds of N and N);
when present, the number of pair lines must be 2*N*F. Then one pair per line, whitespace separated:
``name i j`` (same person, photos i and j) or ``name1 i name2 j`` (different people). Blank lines are skipped.

Layouts (``--layout``), how ``name`` and ``i`` become a file under ``--root``:

* ``lfw`` (default): ``ROOT/name/name_{i:04d}.jpg``, LFW's own layout;
* ``london``: ``ROOT/{name}_neutral.jpg`` for i = 1 and ``ROOT/{name}_smiling.jpg`` for i = 2 (the Face Research
  Lab London Set as bundled in ``data/gallery/london``; the shipped ``data/pairs/london_pairs.txt`` uses it);
* any other value is a Python format pattern with ``{name}`` and ``{index}`` (e.g. ``{name}/{name}_{index:04d}.jpg``
  is ``lfw``).

Methods: ``none``, ``blur``, ``mosaic``, ``blackbox`` (:func:`anonymizer.fallback.apply_region` on every face dlib
finds in the photo, largest first, with ``--margin``), and ``keepr``: the photo pipeline,
``anonymizer.photos.anonymize_image(image_rgb, settings, models) -> (image_rgb, info)`` with ``settings`` the
``InferSettings`` that infer.py builds from the same options (``--config``, ``--generator``, ``--seed``, ...; see
:func:`eval.baselines.keepr_settings`) and ``models`` from ``anonymizer.photos.load_models(settings.models, device)``
when that exists, else ``anonymizer.pipeline.load_models`` after ``check_model_files``. Each photo is anonymized
once, however many pairs it starts.

Recognisers: dlib's ResNet (always; score = minus the descriptor distance) and ArcFace IR-SE-50 when ``--arcface``
gives ``model_ir_se50.pth`` (score = cosine similarity of the embeddings of the FFHQ-aligned face, pSp's crop; see
:class:`models.arcface.ArcFaceRecognizer`); without weights ArcFace is reported as unavailable, never as a number.
Both describe the largest face dlib's detector (``--detector``, ``--upsample``) finds in each photo.

**No face.** When no face is found in either photo of a pair (the anonymized one, typically), the pair is counted
under ``no_face`` and gets the worst possible score: a similarity below every real score, the same for all such pairs
(minus infinity; a finite value below the minimum gives identical numbers, the metrics depend on the order only). The
recogniser then rejects the pair at every threshold: a same-person pair is a miss and a different-person pair a
correct rejection, which is what a verification system does when it sees no face. No-face pairs tie among themselves
(counted half in the AUC, as scikit-learn's ``roc_auc_score`` does), so a method that removes every face (blackbox)
scores AUC 0.5 and TPR 0: chance, not better than chance. ``--locate`` models a stronger attacker who knows where
the face was: an anonymized photo in which no face is found is described at the original photo's face box (68
landmarks predicted inside it), as ``eval.run``'s leakage metrics do; such photos are counted as ``located``.

**Metrics** (:func:`verification_metrics`). A pair is accepted at threshold t when its score >= t. AUC: area under
the ROC curve, equal to the Mann-Whitney probability that a same-person pair outscores a different-person pair (ties
half) -- ``sklearn.metrics.roc_auc_score``. TPR at FPR x: the threshold comes from the different-person pairs' scores
only: with N of them, at most k = floor(x * N) may be accepted, so t is set just above the (k+1)-th highest
different-person score v, and TPR is the share of same-person pairs scoring strictly above v (TPR 1 when k >= N).
This is the step (non-interpolated) rule on scikit-learn's ROC: ``max(tpr[fpr <= x])`` over
``roc_curve(same, score)``; no linear interpolation between ROC points, so only operating points a threshold
actually achieves are reported. With fewer than 1/x different-person pairs, k = 0 and TPR@x is the TPR at FPR 0
(the report flags it).

Outputs in ``--out`` (a new or empty directory, written atomically): ``verification.json`` -- per recogniser
``{"auc", "tpr@1e-3", "tpr@1e-2", "pairs", "same_pairs", "different_pairs", "no_face", "fpr_floor", "reference":
{same keys}}`` or ``{"status": "unavailable", "reason"}``, plus a ``"protocol"`` entry (method, files, rule);
``verification.md`` (the table); ``scores.csv`` (every pair's scores, empty where no face).

``python -m eval.protocols london-pairs --root data/gallery/london --out data/pairs/london_pairs.txt`` rebuilds the
shipped pairs file (see :func:`london_pairs`).
"""
from __future__ import annotations

import argparse
import csv
import importlib
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from keepr.errors import KeeprError, cli_main
from keepr.fileio import atomic_dir, output_lock, write_text_atomic

ROOT = Path(__file__).resolve().parents[1]

METHODS = ("keepr", "blur", "mosaic", "blackbox", "none")
FPR_TARGETS = (("tpr@1e-3", 1e-3), ("tpr@1e-2", 1e-2))
LONDON_INDEX = {1: "neutral", 2: "smiling"}
KEEPR_UNAVAILABLE = ("the keepr method needs the photo pipeline (anonymizer.photos.anonymize_image), "
                     "not available yet")
ARCFACE_UNAVAILABLE = "no --arcface weights given (needs model_ir_se50.pth)"
_INT = re.compile(r"^[0-9]+$")

Anonymizer = Callable[[np.ndarray], "tuple[np.ndarray, dict]"]


# ------------------------------------------------------------------------------------------------------------------
# Pairs.


@dataclass(frozen=True)
class Pair:
    """One line of a pairs file: photo ``index1`` of ``name1`` against photo ``index2`` of ``name2``."""

    name1: str
    index1: int
    name2: str
    index2: int
    same: bool
    line: int = 0  # line number in the pairs file (1-based; 0 when made in code)


def parse_pairs(source: str | Path, text: str | None = None) -> list[Pair]:
    """Pairs from an LFW ``pairs.txt``-format file (``text`` given: parse it, ``source`` only names it in errors).

    See the module docstring for the format. Errors name the file and line, on one line.
    """
    if text is None:
        try:
            text = Path(source).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise KeeprError(f"{source}: pairs file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            cause = getattr(exc, "strerror", None) or exc
            raise KeeprError(f"{source}: cannot read the pairs file ({cause})") from None
    lines = [(n, ln.split()) for n, ln in enumerate(text.splitlines(), 1) if ln.strip()]
    expected = None
    if lines and len(lines[0][1]) in (1, 2) and all(_INT.match(t) for t in lines[0][1]):
        nums = [int(t) for t in lines[0][1]]
        expected = 2 * nums[-1] * (nums[0] if len(nums) == 2 else 1)
        lines = lines[1:]
    pairs = []
    for n, tok in lines:
        try:
            if len(tok) == 3:
                pairs.append(Pair(tok[0], _index(tok[1]), tok[0], _index(tok[2]), True, n))
            elif len(tok) == 4:
                if tok[0] == tok[2]:
                    raise ValueError(f"a different-person line names {tok[0]!r} twice")
                pairs.append(Pair(tok[0], _index(tok[1]), tok[2], _index(tok[3]), False, n))
            else:
                raise ValueError(f"expected 'name i j' or 'name1 i name2 j', got {len(tok)} fields")
        except ValueError as exc:
            raise KeeprError(f"{source}:{n}: {exc}") from None
    if expected is not None and len(pairs) != expected:
        raise KeeprError(f"{source}: the header announces {expected} pairs but the file has {len(pairs)} "
                         f"(truncated or not in LFW's pairs.txt format)")
    if not pairs:
        raise KeeprError(f"{source}: no pairs in the file")
    return pairs


def _index(token: str) -> int:
    if not _INT.match(token):
        raise ValueError(f"photo number {token!r} is not a non-negative integer")
    return int(token)


def photo_path(root: str | Path, name: str, index: int, layout: str = "lfw") -> Path:
    """Where photo ``index`` of ``name`` is under ``root`` for ``layout`` ('lfw', 'london' or a format pattern)."""
    root = Path(root)
    if layout == "lfw":
        return root / name / f"{name}_{index:04d}.jpg"
    if layout == "london":
        if index not in LONDON_INDEX:
            raise KeeprError(f"layout london: photo number must be 1 (neutral) or 2 (smiling), got {index} for {name}")
        return root / f"{name}_{LONDON_INDEX[index]}.jpg"
    if "{name" not in layout or "{index" not in layout:
        raise KeeprError(f"--layout must be 'lfw', 'london' or a pattern with {{name}} and {{index}}, got {layout!r}")
    try:
        return root / layout.format(name=name, index=index)
    except (KeyError, ValueError, IndexError) as exc:
        raise KeeprError(f"--layout {layout!r}: not a usable pattern ({exc})") from None


def london_pairs(ids: Sequence[str], negatives_per_id: int = 10) -> list[Pair]:
    """Pairs over London Set ids (layout ``london``): for every id, neutral vs smiling (same person), then for every
    id its neutral photo vs the smiling photo of ``negatives_per_id`` others, at id-list offsets spread evenly over
    the list (offset 1 + j * (n - 1) // negatives_per_id), so each photo starts or ends the same number of pairs."""
    ids = sorted(dict.fromkeys(ids))
    n = len(ids)
    if n < 2:
        raise KeeprError("london pairs need at least two ids")
    k = min(negatives_per_id, n - 1)
    offsets = sorted({1 + j * (n - 1) // k for j in range(k)})
    same = [Pair(i, 1, i, 2, True) for i in ids]
    diff = [Pair(ids[a], 1, ids[(a + o) % n], 2, False) for a in range(n) for o in offsets]
    return same + diff


def format_pairs(pairs: Sequence[Pair]) -> str:
    """Pairs as pairs.txt lines (no header: the counts of same and different pairs need not be equal)."""
    return "".join(f"{p.name1}\t{p.index1}\t{p.index2}\n" if p.same else
                   f"{p.name1}\t{p.index1}\t{p.name2}\t{p.index2}\n" for p in pairs)


# ------------------------------------------------------------------------------------------------------------------
# Metrics.


def verification_metrics(scores: Sequence[float], same: Sequence[bool]) -> dict:
    """AUC and TPR at FPR 1e-3 / 1e-2 (rule: module docstring) of pair scores (higher = more alike; NaN = no face,
    the worst score). Returns {"auc", "tpr@1e-3", "tpr@1e-2", "pairs", "same_pairs", "different_pairs", "no_face",
    "fpr_floor"} (fpr_floor: 1 / different pairs, the smallest non-zero FPR this set of pairs can resolve)."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(same, dtype=bool).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores for {y.size} labels")
    no_face = np.isnan(s)
    s = np.where(no_face, -np.inf, s)
    pos, neg = s[y], s[~y]
    if pos.size == 0 or neg.size == 0:
        raise KeeprError(f"verification needs same-person and different-person pairs, got {pos.size} and {neg.size}")
    # AUC = Mann-Whitney U / (P N) with tied scores at their average rank (ties count half).
    _, inv, counts = np.unique(s, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = ((ends - counts + 1 + ends) / 2.0)[inv]
    auc = (ranks[y].sum() - pos.size * (pos.size + 1) / 2.0) / (pos.size * neg.size)
    out = {"auc": float(auc)}
    neg_desc = np.sort(neg)[::-1]
    for key, target in FPR_TARGETS:
        k = int(math.floor(target * neg.size * (1 + 1e-12)))  # different-person pairs that may be accepted
        if k >= neg.size:
            out[key] = 1.0
        else:
            out[key] = float(np.count_nonzero(pos > neg_desc[k]) / pos.size)
    out.update(pairs=int(s.size), same_pairs=int(pos.size), different_pairs=int(neg.size),
               no_face=int(no_face.sum()), fpr_floor=1.0 / neg.size)
    return out


# ------------------------------------------------------------------------------------------------------------------
# Recognisers.


class DlibVerifier:
    """dlib's 128-d ResNet descriptor; score = minus the Euclidean distance (same person above -0.6)."""

    name = "dlib"
    label = "dlib ResNet"
    score_rule = "minus dlib descriptor distance"

    def __init__(self):
        from anonymizer.identity import FaceRecognizer  # heavy (torch): only in __init__()

        self.recognizer = FaceRecognizer()

    def describe(self, rgb: np.ndarray, face) -> np.ndarray | None:
        return self.recognizer.descriptor(rgb, face)

    @staticmethod
    def score(a: np.ndarray, b: np.ndarray) -> float:
        from anonymizer.identity import descriptor_distance  # heavy (torch): only in score()

        return -descriptor_distance(a, b)


class ArcFaceVerifier:
    """ArcFace IR-SE-50 embedding of the FFHQ-aligned face (pSp's crop); score = cosine similarity."""

    name = "arcface"
    label = "ArcFace IR-SE-50"
    score_rule = "ArcFace cosine similarity"

    def __init__(self, path: str | Path | None = None, device: str = "cpu", recognizer=None):
        from models.arcface import ArcFaceRecognizer  # heavy (torch): only in __init__()

        self.recognizer = recognizer if recognizer is not None else ArcFaceRecognizer(path, device=device)

    def describe(self, rgb: np.ndarray, face) -> np.ndarray | None:
        return self.recognizer.embed_face(rgb, face.landmarks)

    def score(self, a: np.ndarray, b: np.ndarray) -> float:
        return self.recognizer.similarity(a, b)


# ------------------------------------------------------------------------------------------------------------------
# Methods.


def _import_photos():
    """``anonymizer.photos`` with its ``anonymize_image``; KeeprError when the photo pipeline is not there."""

    try:
        photos = importlib.import_module("anonymizer.photos")
    except ModuleNotFoundError as exc:
        if exc.name in ("anonymizer.photos", "anonymizer"):
            raise KeeprError(KEEPR_UNAVAILABLE) from None
        raise
    if not callable(getattr(photos, "anonymize_image", None)):
        raise KeeprError(KEEPR_UNAVAILABLE)
    return photos


def keepr_anonymizer(options: dict | None = None, device: str = "cpu") -> Anonymizer:
    """``rgb -> (rgb, info)`` running ``anonymizer.photos.anonymize_image(rgb, settings, models)``.

    ``options``: infer.py options without dashes (``{"config": ..., "generator": ..., "seed": 0}``), turned into
    ``InferSettings`` by :func:`eval.baselines.keepr_settings` exactly as infer.py does. ``models`` is loaded once:
    ``anonymizer.photos.load_models(settings.models, device)`` when the photo module has it, else
    ``anonymizer.pipeline.check_model_files(settings.models)`` (missing weights: one-line error before any work) and
    ``anonymizer.pipeline.load_models(settings.models, device)``.
    """
    photos = _import_photos()
    from eval.baselines import keepr_settings  # heavy (cv2): only in keepr_anonymizer()

    settings = keepr_settings(options)
    settings.progress = False
    loader = getattr(photos, "load_models", None)
    if loader is None:
        from anonymizer.pipeline import check_model_files  # heavy (torch): only in keepr_anonymizer()
        from anonymizer.pipeline import load_models as loader  # heavy (torch): only in keepr_anonymizer()

        check_model_files(settings.models)
    models = loader(settings.models, device)

    def run(rgb: np.ndarray) -> tuple[np.ndarray, dict]:
        out, info = photos.anonymize_image(rgb, settings, models)
        return np.asarray(out), dict(info or {})

    return run


def pixel_anonymizer(method: str, margin: float = 0.2, detector: str = "hog", upsample: int = 1) -> Anonymizer:
    """``rgb -> (rgb, info)`` applying ``method`` to every face dlib finds (info: {"faces": count})."""
    from anonymizer.faces import detect_faces  # heavy (torch): only in pixel_anonymizer()
    from anonymizer.fallback import apply_region  # heavy (cv2): only in pixel_anonymizer()

    def run(rgb: np.ndarray, faces=None) -> tuple[np.ndarray, dict]:
        faces = detect_faces(rgb, detector, upsample) if faces is None else faces
        out = rgb.copy()
        for f in faces:
            out = apply_region(out, f.box, method, margin=margin)
        return out, {"faces": len(faces)}

    return run


def make_anonymizer(method: str, margin: float = 0.2, detector: str = "hog", upsample: int = 1,
                    keepr: dict | None = None, device: str = "cpu") -> Anonymizer:
    """The anonymizer for ``method`` (one of :data:`METHODS`); KeeprError for an unknown method or when the keepr
    method's photo pipeline or weights are missing."""
    if method == "keepr":
        return keepr_anonymizer(keepr, device)
    if method in ("blur", "mosaic", "blackbox", "none"):
        return pixel_anonymizer(method, margin, detector, upsample)
    raise KeeprError(f"--method: unknown method {method!r}; choose from {', '.join(METHODS)}")


# ------------------------------------------------------------------------------------------------------------------
# The protocol.


@dataclass
class VerificationResult:
    results: dict  # what verification.json holds
    rows: list[dict]  # one per pair: names, label, scores (None: no face)
    table: str  # verification.md
    files: list[Path] = field(default_factory=list)


def _describe(rgb: np.ndarray, verifiers, detector: str, upsample: int) -> tuple[list, dict[str, np.ndarray | None]]:
    """Faces found (largest first) and each recogniser's vector for the largest one (None: no face)."""
    from anonymizer.faces import detect_faces  # heavy (torch): only in _describe()

    faces = detect_faces(rgb, detector, upsample)
    if not faces:
        return faces, {v.name: None for v in verifiers}
    return faces, {v.name: v.describe(rgb, faces[0]) for v in verifiers}


def _locate(rgb: np.ndarray, original_face, verifiers) -> dict[str, np.ndarray | None]:
    """Each recogniser's vector for the face at the original photo's face box in ``rgb`` (68 landmarks predicted
    inside that box in ``rgb``), for an attacker who knows where the face was."""
    from anonymizer.faces import Face, landmarks_for_box  # heavy (torch): only in _locate()

    box = original_face.detector_box or original_face.box
    face = Face(box=original_face.box, landmarks=landmarks_for_box(rgb, box), score=float("nan"), detector_box=box)
    return {v.name: v.describe(rgb, face) for v in verifiers}


def verify(pairs: str | Path | Sequence[Pair], root: str | Path, method: str, layout: str = "lfw",
           arcface: str | Path | None = None, margin: float = 0.2, detector: str = "hog", upsample: int = 1,
           keepr: dict | None = None, device: str = "cpu", progress: bool = True, locate: bool = False,
           anonymizer: Anonymizer | None = None, arcface_recognizer=None) -> VerificationResult:
    """Run the verification protocol (module docstring) and return its results; nothing is written.

    ``locate``: when no face is found in an anonymized photo, describe it at the original photo's face box instead
    (landmarks predicted inside that box), as an attacker who knows where the face was; counted as ``located``.

    ``anonymizer`` overrides the method's own (``rgb -> (rgb, info)``); ``arcface_recognizer`` gives an
    :class:`models.arcface.ArcFaceRecognizer` instead of a weights path (both for tests and callers that hold one).
    """
    from keepr.images import load_image  # heavy (torch): only in verify()

    pairs_name = str(pairs) if isinstance(pairs, (str, Path)) else "<pairs>"
    pair_list = parse_pairs(pairs) if isinstance(pairs, (str, Path)) else list(pairs)
    if method not in METHODS:
        raise KeeprError(f"--method: unknown method {method!r}; choose from {', '.join(METHODS)}")
    root = Path(root)
    if not root.is_dir():
        raise KeeprError(f"{root}: photo root directory not found")
    paths = {}
    for p in pair_list:
        for name, idx in ((p.name1, p.index1), (p.name2, p.index2)):
            paths[(name, idx)] = photo_path(root, name, idx, layout)
    missing = [q for q in dict.fromkeys(paths.values()) if not q.is_file()]
    if missing:
        raise KeeprError(f"{missing[0]}: photo not found ({len(missing)} of the pairs' {len(set(paths.values()))} "
                         f"photos are missing; check --root and --layout)")
    # Everything that can fail on the user's input fails here, before any photo is processed.
    verifiers: list = [DlibVerifier()]
    unavailable = {}
    if arcface_recognizer is not None or arcface is not None:
        verifiers.append(ArcFaceVerifier(arcface, device, arcface_recognizer))
    else:
        unavailable["arcface"] = ARCFACE_UNAVAILABLE
    pixel = method != "keepr" and anonymizer is None
    run = anonymizer or make_anonymizer(method, margin, detector, upsample, keepr, device)

    originals = sorted(set(paths.values()))
    firsts = sorted({paths[(p.name1, p.index1)] for p in pair_list})

    original_desc, anonymized_desc, anon_info, located = {}, {}, {}, 0
    with tqdm(total=len(originals) + len(firsts), desc=f"verify {method}", unit="photo", disable=not progress,
              leave=False) as bar:
        faces_of = {}
        for path in originals:
            rgb = load_image(path)
            faces_of[path], original_desc[path] = _describe(rgb, verifiers, detector, upsample)
            bar.update()
        for path in firsts:
            rgb = load_image(path)
            out, info = run(rgb, faces_of[path]) if pixel else run(rgb)
            out = np.asarray(out)
            if out.shape != rgb.shape or out.dtype != np.uint8:
                raise KeeprError(f"{path}: the {method} method returned a {out.dtype} {out.shape} image for a "
                                 f"{rgb.dtype} {rgb.shape} photo")
            anon_info[path] = info
            found, anonymized_desc[path] = _describe(out, verifiers, detector, upsample)
            if locate and not found and faces_of[path]:
                anonymized_desc[path] = _locate(out, faces_of[path][0], verifiers)
                located += 1
            bar.update()

    rows, scores = [], {v.name: {"anonymized": [], "reference": []} for v in verifiers}
    for p in pair_list:
        a, b = paths[(p.name1, p.index1)], paths[(p.name2, p.index2)]
        row = {"line": p.line, "name1": p.name1, "index1": p.index1, "name2": p.name2, "index2": p.index2,
               "same": int(p.same)}
        for v in verifiers:
            for kind, first in (("reference", original_desc[a][v.name]), ("anonymized", anonymized_desc[a][v.name])):
                second = original_desc[b][v.name]
                s = None if first is None or second is None else float(v.score(first, second))
                scores[v.name][kind].append(np.nan if s is None else s)
                row[f"{v.name}_{kind}"] = s
        rows.append(row)
    same = [p.same for p in pair_list]
    results: dict = {}
    for v in verifiers:
        r = verification_metrics(scores[v.name]["anonymized"], same)
        r["reference"] = verification_metrics(scores[v.name]["reference"], same)
        r["score"] = v.score_rule
        results[v.name] = {"status": "ok", **r}
    for name, reason in unavailable.items():
        results[name] = {"status": "unavailable", "reason": reason}
    faces_anonymized = [int(i["faces"]) for i in anon_info.values() if isinstance(i, dict) and "faces" in i]
    results["protocol"] = {
        "protocol": "verification", "method": method, "pairs_file": pairs_name, "root": str(root), "layout": layout,
        "anonymized_photos": len(firsts), "photos": len(originals),
        "anonymized_photos_without_face": int(sum(n == 0 for n in faces_anonymized)),
        "located": located if locate else None,
        "detector": detector, "upsample": upsample, "margin": margin if method != "keepr" else None,
        "arcface": None if arcface is None else str(arcface),
        "rule": "accept when score >= t; TPR@x = max TPR over ROC points with FPR <= x (thresholds from the "
                "different-person pairs, no interpolation); no face = worst score",
    }
    return VerificationResult(results=results, rows=rows, table=markdown_table(results))


def _f(v: float, digits: int = 3) -> str:
    return f"{v:.{digits}f}"


def markdown_table(results: dict) -> str:
    """The verification table in the papers' form: per recogniser, the reference row and the method's row."""
    proto = results.get("protocol", {})
    method = proto.get("method", "method")
    if proto.get("located") is not None:
        method += ", face box known"
    lines = ["| recogniser | first photo | AUC | TPR@FPR=1e-3 | TPR@FPR=1e-2 | pairs (same/diff) | no face |",
             "|---|---|---:|---:|---:|---:|---:|"]
    notes = []
    for name in ("dlib", "arcface"):
        r = results.get(name)
        if r is None:
            continue
        label = {"dlib": "dlib ResNet", "arcface": "ArcFace IR-SE-50"}[name]
        if r.get("status") != "ok":
            lines.append(f"| {label} | – | unavailable | | | | |")
            notes.append(f"{label}: {r.get('reason', 'unavailable')}")
            continue
        for kind, m in (("original (reference)", r["reference"]), (method, r)):
            lines.append(f"| {label} | {kind} | {_f(m['auc'])} | {_f(m['tpr@1e-3'])} | {_f(m['tpr@1e-2'])} | "
                         f"{m['pairs']} ({m['same_pairs']}/{m['different_pairs']}) | {m['no_face']} |")
        if r["different_pairs"] * 1e-3 < 1:
            notes.append(f"{label}: {r['different_pairs']} different-person pairs resolve FPR down to "
                         f"{r['fpr_floor']:.2g} only; TPR@FPR=1e-3 is the TPR at FPR 0")
    text = "\n".join(lines) + "\n"
    text += (f"\nVerification after anonymizing the first photo of each pair with `{method}` "
             f"(pairs: {proto.get('pairs_file', '?')}). Lower is better for privacy: TPR at a fixed FPR with "
             "thresholds from the different-person pairs' scores (no interpolation), ROC AUC; the reference rows "
             "are the un-anonymized pairs. No face: pairs where no face was found in a photo, scored as a "
             "rejection at every threshold.")
    if proto.get("located") is not None:
        text += (f" Face box known (--locate): {proto['located']} anonymized photos where the detector found no "
                 "face were described at the original face box.")
    text += "\n"
    if notes:
        text += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    return text


def scores_csv(rows: list[dict]) -> str:
    keys: list[str] = []
    for r in rows:
        keys.extend(k for k in r if k not in keys)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None else (f"{v:.6f}" if isinstance(v, float) else v)) for k, v in r.items()})
    return buf.getvalue()


def write_outputs(result: VerificationResult, out: str | Path) -> list[Path]:
    """verification.json, verification.md and scores.csv in ``out`` (new or empty), all at once or nothing."""

    names = ("verification.json", "verification.md", "scores.csv")
    with output_lock(out) as dest, atomic_dir(dest) as tmp:
        (tmp / names[0]).write_text(json.dumps(result.results, indent=1, allow_nan=False) + "\n")
        (tmp / names[1]).write_text(result.table)
        (tmp / names[2]).write_text(scores_csv(result.rows))
    result.files = [Path(out) / n for n in names]
    return result.files


# ------------------------------------------------------------------------------------------------------------------
# Command line.


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.protocols", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="face verification after anonymizing the first photo of each pair")
    v.add_argument("--pairs", required=True, help="pairs file in LFW's pairs.txt format")
    v.add_argument("--root", required=True, help="directory holding the photos")
    v.add_argument("--layout", default="lfw",
                   help="'lfw' (ROOT/name/name_0001.jpg), 'london' (ROOT/<id>_neutral.jpg = 1, _smiling.jpg = 2) "
                        "or a pattern with {name} and {index}")
    v.add_argument("--method", required=True, choices=METHODS)
    v.add_argument("--arcface", default=None, help="model_ir_se50.pth (TreB1eN/InsightFace_Pytorch, as in pSp/e4e)")
    v.add_argument("--out", default=None, help="output directory (new or empty); omit to print the table only")
    v.add_argument("--margin", type=float, default=0.2, help="pixel methods: face box growth per side")
    v.add_argument("--detector", default="hog", choices=["hog", "cnn"], help="dlib face detector")
    v.add_argument("--upsample", type=int, default=1, help="dlib detector upsampling steps")
    v.add_argument("--locate", action="store_true",
                   help="anonymized photos where no face is found are described at the original face box (an "
                        "attacker who knows where the face was) instead of counting as no face")
    v.add_argument("--device", default="cpu", help="torch device for ArcFace and keepr")
    v.add_argument("--no_progress", action="store_true", help="no progress bar")
    g = v.add_argument_group("keepr method (infer.py options)")
    for name in ("config", "generator", "encoder", "cosegmentation", "cosegmentation_config"):
        g.add_argument(f"--{name}", default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--candidate", type=int, default=None)
    lp = sub.add_parser("london-pairs", help="write the pairs file of the bundled London photos")
    lp.add_argument("--root", default=str(ROOT / "data" / "gallery" / "london"))
    lp.add_argument("--negatives_per_id", type=int, default=10)
    lp.add_argument("--out", required=True, help="pairs file to write")
    return p


@cli_main
def main(argv: Sequence[str] | None = None):
    args = build_parser().parse_args(argv)
    if args.command == "london-pairs":
        root = Path(args.root)
        ids = sorted(q.stem[:-len("_neutral")] for q in root.glob("*_neutral.jpg")
                     if (root / (q.stem[:-len("_neutral")] + "_smiling.jpg")).is_file())
        pairs = london_pairs(ids, args.negatives_per_id)
        write_text_atomic(args.out, format_pairs(pairs))
        print(f"wrote {args.out}: {sum(p.same for p in pairs)} same-person and {sum(not p.same for p in pairs)} "
              f"different-person pairs over {len(ids)} ids")
        return pairs
    if args.out is not None:
        out = Path(args.out)  # a busy --out fails before the work, not after it
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise KeeprError(f"{out}: output exists and is not an empty directory; choose another --out or remove it")
    keepr = {k: getattr(args, k) for k in ("config", "generator", "encoder", "cosegmentation", "cosegmentation_config",
                                           "seed", "candidate") if getattr(args, k) is not None}
    result = verify(args.pairs, args.root, args.method, layout=args.layout, arcface=args.arcface, margin=args.margin,
                    detector=args.detector, upsample=args.upsample, keepr=keepr, device=args.device,
                    progress=not args.no_progress, locate=args.locate)
    print(result.table, end="")
    if args.out is not None:
        for f in write_outputs(result, args.out):
            print(f"wrote {f}")
    return result


if __name__ == "__main__":
    main()
