"""eval.protocols: LFW pairs parsing, layouts, the verification metrics against scikit-learn, and the protocol on a
few bundled London pairs (none = reference, blackbox = chance, blur checked against a direct computation)."""
from __future__ import annotations

import json
import math
import sys
import types

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from eval import protocols as P
from keepr.errors import KeeprError, MissingWeightsError

IDS = ["001", "002", "003", "004"]  # 4 same-person + 12 different-person pairs, 8 photos: a few seconds per run


@pytest.fixture(scope="module")
def gallery(fixtures_dir):
    return fixtures_dir.parents[1] / "data" / "gallery" / "london"


@pytest.fixture(scope="module")
def small_pairs(tmp_path_factory):
    pairs = P.london_pairs(IDS, negatives_per_id=3)
    path = tmp_path_factory.mktemp("pairs") / "pairs.txt"
    path.write_text(P.format_pairs(pairs))
    return path


def sklearn_numbers(scores, same) -> dict:
    """AUC and TPR@FPR straight from scikit-learn (no face: a finite score below every real one)."""
    s = np.asarray(scores, dtype=np.float64)
    finite = s[np.isfinite(s)]
    s = np.where(np.isnan(s), (finite.min() if finite.size else 0.0) - 1.0, s)
    fpr, tpr, _ = roc_curve(same, s, drop_intermediate=False)
    return {"auc": roc_auc_score(same, s), "tpr@1e-3": tpr[fpr <= 1e-3].max(), "tpr@1e-2": tpr[fpr <= 1e-2].max()}


def assert_same_numbers(ours: dict, ref: dict) -> None:
    for k in ("auc", "tpr@1e-3", "tpr@1e-2"):
        assert ours[k] == pytest.approx(ref[k], abs=1e-12), k


# ----------------------------------------------------------------------------------------------------------------
# Pairs files and layouts.


def test_parse_both_line_forms_and_headers():
    body = "Abel_Pacheco\t1\t4\nAkhmed_Zakayev 1 3\n\nAbdel_Madi_Shabneh\t1\tDean_Barker\t1\nA 2 B 3\n"
    for header in ("", "2\n", "1\t2\n"):
        pairs = P.parse_pairs("pairs.txt", header + body)
        assert [p.same for p in pairs] == [True, True, False, False]
        assert pairs[0] == P.Pair("Abel_Pacheco", 1, "Abel_Pacheco", 4, True, 1 + bool(header))
        assert (pairs[2].name1, pairs[2].index1, pairs[2].name2, pairs[2].index2) == ("Abdel_Madi_Shabneh", 1,
                                                                                      "Dean_Barker", 1)
        assert pairs[3].line == 5 + bool(header)
    # London ids are numbers too: a 3-field line is a pair, never a header.
    assert P.parse_pairs("x", "001 1 2\n002 1 001 2\n")[0].same
    for text, msg in (("3\n" + body, "announces 6 pairs but the file has 4"),
                      ("2 2\n" + body, "announces 8 pairs"),
                      ("a 1\n", "x:1: expected 'name i j'"),
                      ("a 1 b\n", "x:1: photo number 'b'"),
                      ("a 1 a 2\n", "names 'a' twice"),
                      ("", "no pairs")):
        with pytest.raises(KeeprError, match=msg):
            P.parse_pairs("x", text)


def test_layouts(tmp_path):
    assert P.photo_path(tmp_path, "Abel_Pacheco", 4) == tmp_path / "Abel_Pacheco" / "Abel_Pacheco_0004.jpg"
    assert P.photo_path(tmp_path, "007", 2, "london") == tmp_path / "007_smiling.jpg"
    assert P.photo_path(tmp_path, "x", 3, "{name}/{name}_{index:04d}.jpg") == P.photo_path(tmp_path, "x", 3)
    with pytest.raises(KeeprError, match="1 \\(neutral\\) or 2"):
        P.photo_path(tmp_path, "007", 3, "london")
    with pytest.raises(KeeprError, match="--layout"):
        P.photo_path(tmp_path, "x", 1, "photos/*.jpg")


def test_shipped_london_pairs(gallery, fixtures_dir):
    shipped = fixtures_dir.parents[1] / "data" / "pairs" / "london_pairs.txt"
    pairs = P.parse_pairs(shipped)
    ids = sorted(q.stem[:-len("_neutral")] for q in gallery.glob("*_neutral.jpg"))
    assert shipped.read_text() == P.format_pairs(P.london_pairs(ids))  # what `london-pairs` writes
    assert sum(p.same for p in pairs) == len(ids) == 102 and sum(not p.same for p in pairs) == 1020
    assert all(P.photo_path(gallery, n, i, "london").is_file()
               for p in pairs for n, i in ((p.name1, p.index1), (p.name2, p.index2)))
    assert len({(p.name1, p.name2) for p in pairs}) == len(pairs)  # no pair twice


# ----------------------------------------------------------------------------------------------------------------
# Metrics against scikit-learn.


@pytest.mark.parametrize("seed", range(6))
def test_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    n_same, n_diff = int(rng.integers(5, 60)), int(rng.integers(20, 2500))
    same = np.r_[np.ones(n_same, bool), np.zeros(n_diff, bool)]
    scores = np.r_[rng.normal(1.0, 1.0, n_same), rng.normal(0.0, 1.0, n_diff)]
    if seed % 2:  # ties, inside and across the classes
        scores = np.round(scores, 1)
    if seed >= 2:  # no-face pairs in both classes
        scores[rng.random(scores.size) < 0.1] = np.nan
    ours = P.verification_metrics(scores, same)
    assert_same_numbers(ours, sklearn_numbers(scores, same))
    assert ours["pairs"] == n_same + n_diff and ours["no_face"] == int(np.isnan(scores).sum())


def test_tpr_rule_by_hand():
    # 4 different-person pairs: FPR 1e-2 allows none of them, so the threshold sits above the best one (0.5).
    m = P.verification_metrics([0.9, 0.5, 0.4, np.nan, 0.5, 0.1, 0.0, -1.0], [1, 1, 1, 1, 0, 0, 0, 0])
    assert m["tpr@1e-2"] == m["tpr@1e-3"] == 0.25  # only 0.9 > 0.5; the tie at 0.5 is not accepted
    assert m["auc"] == pytest.approx((4 + 3.5 + 3 + 0) / 16)  # wins per same-person pair, ties half
    assert m["fpr_floor"] == 0.25
    assert P.verification_metrics([np.nan] * 4, [1, 1, 0, 0])["auc"] == 0.5  # no face at all: chance
    with pytest.raises(KeeprError, match="same-person and different-person"):
        P.verification_metrics([0.1, 0.2], [1, 1])


# ----------------------------------------------------------------------------------------------------------------
# The protocol on bundled photos.


@pytest.fixture(scope="module")
def direct(small_pairs, gallery):
    """dlib descriptors of the original photos and the largest detected face, computed without eval.protocols."""
    from anonymizer.faces import detect_faces
    from anonymizer.identity import FaceRecognizer
    from keepr.images import load_image

    rec = FaceRecognizer()
    images = {}
    for p in P.parse_pairs(small_pairs):
        for n, i in ((p.name1, p.index1), (p.name2, p.index2)):
            path = P.photo_path(gallery, n, i, "london")
            if path not in images:
                rgb = load_image(path)
                images[path] = (rgb, detect_faces(rgb), rec.descriptor(rgb))
    return rec, images


def light_blur(rgb, box):
    """A weak blur (sigma 2% of the face) that dlib still sees through: scores change but faces stay detectable."""
    from anonymizer.fallback import blur_region

    return blur_region(rgb, box, sigma_frac=0.02)


def direct_scores(small_pairs, gallery, direct, method):
    """-distance per pair with the first photo anonymized by ``method`` (a name for apply_region, or a function of
    (rgb, box)) on every detected face (NaN: no face)."""
    from anonymizer.fallback import apply_region

    op = method if callable(method) else (lambda rgb, box: apply_region(rgb, box, method))
    rec, images = direct
    out, same = [], []
    for p in P.parse_pairs(small_pairs):
        rgb, faces, _ = images[P.photo_path(gallery, p.name1, p.index1, "london")]
        anon = rgb
        for f in faces:
            anon = op(anon, f.box)
        a = rec.descriptor(anon)
        b = images[P.photo_path(gallery, p.name2, p.index2, "london")][2]
        out.append(np.nan if a is None or b is None else -float(np.linalg.norm(a - b)))
        same.append(p.same)
    return np.array(out), np.array(same)


def test_none_equals_reference_via_the_command(small_pairs, gallery, direct, tmp_path, capsys):
    out = tmp_path / "verify_none"
    P.main(["verify", "--pairs", str(small_pairs), "--root", str(gallery), "--layout", "london", "--method", "none",
            "--out", str(out), "--no_progress"])
    assert sorted(q.name for q in out.iterdir()) == ["scores.csv", "verification.json", "verification.md"]
    res = json.loads((out / "verification.json").read_text())
    d = res["dlib"]
    for k in ("auc", "tpr@1e-3", "tpr@1e-2", "pairs", "no_face"):
        assert d[k] == d["reference"][k], k
    assert d["pairs"] == 16 and d["same_pairs"] == 4 and d["no_face"] == 0
    assert res["arcface"] == {"status": "unavailable", "reason": P.ARCFACE_UNAVAILABLE}
    assert res["protocol"]["method"] == "none" and res["protocol"]["anonymized_photos"] == 4
    scores, same = direct_scores(small_pairs, gallery, direct, "none")
    assert_same_numbers(d, sklearn_numbers(scores, same))
    assert_same_numbers(d["reference"], sklearn_numbers(scores, same))
    table = (out / "verification.md").read_text()
    assert "| dlib ResNet | original (reference) |" in table and "| dlib ResNet | none |" in table
    assert "unavailable" in table and "ArcFace" in table and table in capsys.readouterr().out
    # A second run into the same --out fails at once, on one line.
    with pytest.raises(SystemExit):
        P.main(["verify", "--pairs", str(small_pairs), "--root", str(gallery), "--layout", "london", "--method",
                "none", "--out", str(out), "--no_progress"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not an empty directory" in err


def test_numbers_match_sklearn_and_arcface_scores(small_pairs, gallery, direct, fixtures_dir):
    """Every number against scikit-learn on directly computed distances, with a light blur as the method (the
    default blur leaves dlib no face at all on these 256 px photos: no-face pairs only, a weak check)."""
    from anonymizer.faces import detect_faces
    from models.arcface import ArcFaceRecognizer, load_arcface

    def anonymizer(rgb):
        faces = detect_faces(rgb)
        for f in faces:
            rgb = light_blur(rgb, f.box)
        return rgb, {"faces": len(faces)}

    fx = fixtures_dir / "arcface" / "public"
    narrow = load_arcface(fx / "state_dict.safetensors", widths=(16, 18, 20, 32), embedding_size=32)
    rec = ArcFaceRecognizer(model=narrow)  # random weights: checks the wiring, not recognition
    result = P.verify(small_pairs, gallery, "blur", layout="london", progress=False, arcface_recognizer=rec,
                      anonymizer=anonymizer)
    scores, same = direct_scores(small_pairs, gallery, direct, light_blur)
    assert np.isfinite(scores).all()
    assert_same_numbers(result.results["dlib"], sklearn_numbers(scores, same))
    ref = np.array([np.nan if r["dlib_reference"] is None else r["dlib_reference"] for r in result.rows])
    assert_same_numbers(result.results["dlib"]["reference"], sklearn_numbers(ref, same))
    assert np.isfinite(ref).all() and np.abs(scores - ref).max() > 0.05  # the light blur moves the descriptors
    got = np.array([np.nan if r["dlib_anonymized"] is None else r["dlib_anonymized"] for r in result.rows])
    assert np.allclose(got, scores, atol=1e-12, equal_nan=True)
    assert result.results["dlib"]["no_face"] == 0
    a = result.results["arcface"]
    assert a["status"] == "ok" and a["pairs"] == 16
    arc = np.array([np.nan if r["arcface_anonymized"] is None else r["arcface_anonymized"] for r in result.rows])
    assert_same_numbers(a, sklearn_numbers(arc, same))
    # One ArcFace score by hand: the blurred first photo against the second.
    _, images = direct
    k = next(k for k, r in enumerate(result.rows) if r["arcface_anonymized"] is not None)
    p = P.parse_pairs(small_pairs)[k]
    rgb, faces, _ = images[P.photo_path(gallery, p.name1, p.index1, "london")]
    blurred = rgb
    for f in faces:
        blurred = light_blur(blurred, f.box)
    e1 = rec.embed_face(blurred)
    e2 = rec.embed_face(images[P.photo_path(gallery, p.name2, p.index2, "london")][0])
    assert result.rows[k]["arcface_anonymized"] == pytest.approx(float(e1 @ e2), abs=1e-6)  # float32 embeddings
    assert "| ArcFace IR-SE-50 | blur |" in result.table


def test_blackbox_is_chance(small_pairs, gallery):
    result = P.verify(small_pairs, gallery, "blackbox", layout="london", progress=False)
    d = result.results["dlib"]
    # Chance: with P same and N different pairs, the AUC of uninformative scores has mean 0.5 and standard deviation
    # sqrt((P + N + 1) / (12 P N)) (Mann-Whitney null); allow 3 of them. Here dlib finds no face in any blacked-out
    # photo, so every pair gets the same worst score and the AUC is exactly 0.5.
    sd = math.sqrt((d["same_pairs"] + d["different_pairs"] + 1) / (12 * d["same_pairs"] * d["different_pairs"]))
    assert abs(d["auc"] - 0.5) <= 3 * sd
    assert d["no_face"] == d["pairs"] and d["auc"] == 0.5 and d["tpr@1e-2"] == 0.0 and d["tpr@1e-3"] == 0.0
    assert d["reference"]["auc"] > 0.9  # the same pairs un-anonymized are easy
    assert result.results["protocol"]["anonymized_photos_without_face"] == 0  # every photo had a face to paint


def test_keepr_method_needs_the_photo_pipeline(small_pairs, gallery, monkeypatch):
    monkeypatch.setitem(sys.modules, "anonymizer.photos", None)  # import fails as if the module did not exist
    with pytest.raises(KeeprError) as e:
        P.verify(small_pairs, gallery, "keepr", layout="london", progress=False)
    assert str(e.value) == P.KEEPR_UNAVAILABLE


def test_keepr_method_calls_anonymize_image(small_pairs, gallery, monkeypatch):
    """The contract with the photo pipeline: load_models(settings.models, device) once, then
    anonymize_image(image_rgb, settings, models) -> (image_rgb, info) per first photo."""
    from anonymizer.faces import detect_faces
    from anonymizer.fallback import apply_region

    calls = {"load": [], "anonymize": 0}
    fake = types.ModuleType("anonymizer.photos")

    def load_models(paths, device="cpu"):
        calls["load"].append((paths, device))
        return "MODELS"

    def anonymize_image(image_rgb, settings, models):
        assert models == "MODELS" and settings.seed == 3 and image_rgb.dtype == np.uint8
        calls["anonymize"] += 1
        faces = detect_faces(image_rgb)
        out = image_rgb
        for f in faces:
            out = apply_region(out, f.box, "blackbox")
        return out, {"faces": len(faces)}

    fake.load_models, fake.anonymize_image = load_models, anonymize_image
    monkeypatch.setitem(sys.modules, "anonymizer.photos", fake)
    result = P.verify(small_pairs, gallery, "keepr", layout="london", progress=False, keepr={"seed": 3})
    assert len(calls["load"]) == 1 and calls["anonymize"] == len(IDS)
    assert result.results["dlib"]["no_face"] == 16 and result.results["protocol"]["method"] == "keepr"


def test_missing_inputs_fail_before_work(small_pairs, gallery, tmp_path):
    with pytest.raises(MissingWeightsError, match="model_ir_se50.pth"):
        P.verify(small_pairs, gallery, "none", layout="london", arcface=tmp_path / "model_ir_se50.pth")
    with pytest.raises(KeeprError, match="photo not found .*check --root and --layout"):
        P.verify(small_pairs, gallery, "none", layout="lfw")
    with pytest.raises(KeeprError, match="pairs file not found"):
        P.verify(tmp_path / "nope.txt", gallery, "none")
    with pytest.raises(KeeprError, match="unknown method"):
        P.verify(small_pairs, gallery, "swirl", layout="london")


def test_locate_describes_the_original_box(small_pairs, gallery, direct):
    """--locate: a blurred photo without a detectable face is described at the original face box."""
    from anonymizer.faces import Face, landmarks_for_box
    from anonymizer.fallback import apply_region

    result = P.verify(small_pairs, gallery, "blur", layout="london", progress=False, locate=True)
    rec, images = direct
    proto = result.results["protocol"]
    assert proto["located"] == len(IDS) and result.results["dlib"]["no_face"] == 0  # dlib sees no blurred face
    p = P.parse_pairs(small_pairs)[0]
    rgb, faces, _ = images[P.photo_path(gallery, p.name1, p.index1, "london")]
    blurred = apply_region(rgb, faces[0].box, "blur")
    box = faces[0].detector_box
    a = rec.descriptor(blurred, Face(box=faces[0].box, landmarks=landmarks_for_box(blurred, box), score=0.0,
                                     detector_box=box))
    b = images[P.photo_path(gallery, p.name2, p.index2, "london")][2]
    assert result.rows[0]["dlib_anonymized"] == pytest.approx(-float(np.linalg.norm(a - b)), abs=1e-12)
    assert "face box known" in result.table


@pytest.mark.slow
def test_keepr_method_with_the_tiny_models(gallery, tiny_models, tmp_path, capsys):
    """`verify --method keepr` through the real photo pipeline (anonymizer.photos) on 2 ids (2 same-person and 2
    different-person pairs) with the tiny random models: the wiring and the outputs, not the privacy numbers."""
    pairs = tmp_path / "pairs.txt"
    pairs.write_text(P.format_pairs(P.london_pairs(IDS[:2], negatives_per_id=1)))
    out = tmp_path / "verify_keepr"
    result = P.main(["verify", "--pairs", str(pairs), "--root", str(gallery), "--layout", "london", "--method",
                     "keepr", "--config", str(tiny_models["config"]), "--seed", "1", "--out", str(out),
                     "--no_progress"])
    res = json.loads((out / "verification.json").read_text())
    proto, d = res["protocol"], res["dlib"]
    assert proto["method"] == "keepr" and proto["anonymized_photos"] == 2 and proto["margin"] is None
    assert proto["anonymized_photos_without_face"] == 0  # the photo path found the face in both first photos
    assert d["status"] == "ok" and d["pairs"] == 4 and d["same_pairs"] == 2
    assert d["reference"]["no_face"] == 0 and 0.0 <= d["auc"] <= 1.0
    assert "| dlib ResNet | keepr |" in (out / "verification.md").read_text()
    # The first photos were anonymized with the same settings and models the API gives.
    from anonymizer.photos import anonymize_image, load_models
    from eval.baselines import keepr_settings
    from keepr.images import load_image

    s = keepr_settings({"config": str(tiny_models["config"]), "seed": 1})
    rgb = load_image(P.photo_path(gallery, IDS[0], 1, "london"))
    anon, info = anonymize_image(rgb, s, load_models(s.models))
    assert anon.shape == rgb.shape and info["faces"] >= 1 and info["persons"][0]["chosen"]
    row = next(r for r in result.rows if r["name1"] == IDS[0] and r["same"])
    from anonymizer.identity import FaceRecognizer

    rec = FaceRecognizer()
    a, b = rec.descriptor(anon), rec.descriptor(load_image(P.photo_path(gallery, IDS[0], 2, "london")))
    expect = None if a is None or b is None else -float(np.linalg.norm(a - b))
    assert row["dlib_anonymized"] == (pytest.approx(expect, abs=1e-12) if expect is not None else None)
