"""Photos (anonymizer/photos.py, infer.py --images) with the tiny models: the in-memory API, the batched stages
against their one-face forms, a folder with nested sub-folders, a PNG with alpha, an EXIF-rotated JPEG, a photo
without a face and an unreadable file; a rerun skips everything; a run killed midway and rerun ends with the same
files as an uninterrupted run."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from keepr.fileio import sha256_file

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
FAST = ["--progress", "false", "--virtual_face.num_candidates", "3", "--swap.batch_size", "2"]


@pytest.fixture(scope="module")
def photos(media_dir) -> Path:
    return media_dir / "photos"


@pytest.fixture(scope="module")
def tiny_settings(tiny_models):
    from anonymizer.cli import build_parser, settings_from_args

    def make(*extra):
        argv = ["--images", "x", "--out", "x", "--config", str(tiny_models["config"]), *FAST, *extra]
        return settings_from_args(build_parser().parse_args(argv))

    return make


@pytest.fixture(scope="module")
def models(tiny_settings):
    from anonymizer.photos import load_models

    return load_models(tiny_settings().models)


def rgb_of(path: Path) -> np.ndarray:
    from PIL import ImageOps

    with Image.open(path) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


@pytest.fixture(scope="module")
def tree(tmp_path_factory, photos) -> Path:
    """A folder as a user has one: nested sub-folders, a PNG with alpha, a JPEG stored sideways with an EXIF
    orientation tag, a photo without a face and a file that is not an image."""
    d = tmp_path_factory.mktemp("tree") / "in"
    (d / "a" / "b").mkdir(parents=True)
    shutil.copy(photos / "london_512" / "001_neutral.jpg", d / "a" / "001_neutral.jpg")
    shutil.copy(photos / "london_512" / "002_smiling.jpg", d / "a" / "b" / "002_smiling.jpg")
    rgb = np.asarray(Image.open(photos / "london_512" / "003_neutral.jpg").convert("RGB"))
    yy, xx = np.mgrid[0:rgb.shape[0], 0:rgb.shape[1]]
    alpha = ((xx + yy) * 255 // (xx + yy).max()).astype(np.uint8)
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(d / "a" / "alpha.png")
    upright = Image.open(photos / "lisa" / "lisa1.jpg").convert("RGB")  # 600 x 800
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the pixels are stored turned 90 CCW
    upright.transpose(Image.Transpose.ROTATE_90).save(d / "b_rotated.JPG", exif=exif.tobytes(), quality=95)
    g = np.dstack([xx % 256, yy % 256, np.full_like(xx, 128)]).astype(np.uint8)
    Image.fromarray(g).save(d / "gradient.png")
    (d / "a" / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 20)
    (d / "notes.txt").write_text("not a photo\n")
    return d


def call_infer(args: list[str]) -> int:
    import infer

    try:
        infer.main(args)
        return 0
    except SystemExit as e:
        return int(e.code or 0)


# ----------------------------------------------------------------------------------------------------------------
# The API.


def test_face_seed_is_stable():
    import hashlib

    from anonymizer.photos import face_seed

    assert face_seed(0, "a/b.jpg", 0) == face_seed(0, "a/b.jpg", 0) == 1456892610  # pinned: outputs depend on it
    digest = hashlib.sha256(b"keepr-photo\x007\x00a/b.jpg\x002").digest()
    assert face_seed(7, "a/b.jpg", 2) == int.from_bytes(digest[:4], "big")
    assert len({face_seed(s, n, k) for s in (0, 1) for n in ("a.jpg", "b.jpg") for k in (0, 1)}) == 8
    assert all(0 <= face_seed(s, "x", 3) < 2 ** 32 for s in (0, 2 ** 32 - 1))


@pytest.mark.parametrize("name,mode", [("x.webp", "RGB"), ("x.webp", "RGBA"), ("x.bmp", "RGB"), ("x.png", "L"),
                                       ("x.png", "LA"), ("x.png", "P"), ("x.png", "I;16"), ("x.jpeg", "L")])
def test_read_write_round_trip(tmp_path, name, mode):
    """Every format and mode comes back in its format, size and (colour, gray, alpha) mode; alpha exactly."""
    from anonymizer.photos import read_photo, write_photo

    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (37, 53, 4), dtype=np.uint8)
    im = Image.fromarray(rgba, "RGBA")
    if mode == "I;16":
        im = Image.fromarray(rgba[..., 0].astype(np.uint16) * 257)
    elif mode == "P":
        im = im.convert("RGB").quantize(16)
        im.info["transparency"] = 0
    elif mode != "RGBA":
        im = im.convert(mode)
    src = tmp_path / name
    im.save(src, **({"transparency": 0} if mode == "P" else {}))
    ph = read_photo(src)
    assert ph.rgb.shape == (37, 53, 3) and ph.rgb.dtype == np.uint8
    dest = tmp_path / "out" / name
    write_photo(ph, ph.rgb, dest)
    with Image.open(dest) as b:
        assert b.format == Image.open(src).format and b.size == (53, 37)
        want = {"L": "L", "LA": "LA", "I;16": "L", "P": "RGBA", "RGBA": "RGBA"}.get(mode, "RGB")
        assert b.mode == want, (mode, b.mode)
        if want in ("RGBA", "LA"):
            assert np.array_equal(np.asarray(b)[..., -1], ph.alpha)
        if name.endswith((".png", ".bmp")) and mode not in ("P",):
            assert np.array_equal(np.asarray(b.convert("RGB")), ph.rgb)  # lossless formats: the same pixels
    if mode == "I;16":
        assert np.array_equal(ph.rgb[..., 0], rgba[..., 0])


def test_anonymize_image(photos, tiny_settings, models):
    from anonymizer.photos import anonymize_image, face_seed

    rgb = rgb_of(photos / "london_512" / "001_neutral.jpg")
    s = tiny_settings("--blend.mask", "crop")  # the whole crop is pasted: the face is covered by the swap
    out, info = anonymize_image(rgb, s, models)
    assert out.shape == rgb.shape and out.dtype == np.uint8
    assert info["faces"] == 1 and info["complete"] and info["by_swap"] == 1
    p = info["persons"][0]
    assert p["chosen"] and p["virtual_face"]["seed"] == face_seed(0, "", 0)
    assert len(p["virtual_face"]["candidates"]) == 3 and "chosen" in p["virtual_face"]
    assert info["coverage"][0]["result"] == "swap" and "identity_distance" in info["coverage"][0]
    x0, y0, x1, y1 = (int(v) for v in info["coverage"][0]["box"])
    assert np.abs(out[y0:y1, x0:x1].astype(int) - rgb[y0:y1, x0:x1]).mean() > 5  # the face changed
    assert np.array_equal(out[:, :20], rgb[:, :20])  # far from the face nothing changed
    out2, info2 = anonymize_image(rgb, s, models)
    assert np.array_equal(out, out2)  # deterministic
    # Another name, other seeds, another face.
    out3, info3 = anonymize_image(rgb, s, models, name="other.jpg")
    assert info3["persons"][0]["virtual_face"]["seed"] == face_seed(0, "other.jpg", 0) and not np.array_equal(out, out3)
    # No face: the photo comes back unchanged; an impossible --face choice is an error.
    g = np.zeros((200, 300, 3), np.uint8)
    same, none = anonymize_image(g, s, models)
    assert none["faces"] == 0 and np.array_equal(same, g)
    from keepr.errors import KeeprError

    with pytest.raises(KeeprError, match="person index 3 out of range"):
        anonymize_image(rgb, tiny_settings("--face", "3"), models)


def test_batched_stages_match_one_face_forms(photos, tiny_settings, models):
    """make_virtual_faces = build_virtual_face per face; swap_faces (faces paired with their own virtual faces in one
    batch) = each face's PartSwapper."""
    import torch

    from anonymizer.crop import crop_box, crop_frame
    from anonymizer.photos import find_persons, make_virtual_faces, swap_faces
    from anonymizer.pipeline import make_target
    from anonymizer.render import to_tensor, to_uint8
    from anonymizer.virtual_face import build_virtual_face

    s = tiny_settings("--swap.batch_size", "3")
    imgs = [rgb_of(photos / "london_512" / n) for n in ("001_neutral.jpg", "002_smiling.jpg", "004_neutral.jpg")]
    persons = [find_persons(im, s, models.recognizer).persons[0] for im in imgs]
    jobs = [(p.best.best_image, p.best.best_landmarks - np.array(p.best.best_offset), 11 + k)
            for k, p in enumerate(persons)]
    vfs = make_virtual_faces(models, jobs, s)
    for (image, lm, seed), vf in zip(jobs, vfs):
        ref = build_virtual_face(models, image, lm, s.virtual_face, seed=seed)
        assert vf.report == ref.report
        assert np.abs(vf.image.astype(int) - ref.image).max() <= 1
        assert np.allclose(vf.latent, ref.latent, atol=1e-5)
    targets = [make_target(p, vf, models, s, 1) for p, vf in zip(persons, vfs)]
    size = int(models.coseg.img_size)
    crops = [crop_frame(im, crop_box(t.timeline[0].box, s.crop.scale, s.crop.shift_y), size)[0]
             for im, t in zip(imgs, targets)]
    ys, ms = swap_faces(targets, crops, s, models)
    for t, c, y, m in zip(targets, crops, ys, ms):
        with torch.no_grad():
            y1, m1 = t.swapper(to_tensor([c], "cpu"), return_mask=True)
        assert np.abs(to_uint8(y1)[0].astype(int) - y).max() <= 1
        assert np.allclose(m1[0, 0].numpy(), m, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# A folder.


def outputs(out: Path) -> dict[str, str]:
    """sha256 of every file under ``out`` except the report and the records (they hold timings)."""
    return {p.relative_to(out).as_posix(): sha256_file(p) for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != "report.json" and ".keepr" not in p.relative_to(out).parts}


@pytest.mark.slow
def test_folder(tree, tiny_models, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--images", str(tree), "--out", str(out), "--config", str(tiny_models["config"]), *FAST]
    assert call_infer(args) == 1  # the unreadable file
    cap = capsys.readouterr()
    err = [ln for ln in cap.err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: 1 of 6 photo(s) failed, e.g. ") and "broken.jpg" in err[0], err
    assert "wrote" in cap.out
    rep = json.loads((out / "report.json").read_text())
    by = {e["path"]: e for e in rep["images"]}
    assert sorted(by) == ["a/001_neutral.jpg", "a/alpha.png", "a/b/002_smiling.jpg", "a/b/broken.jpg",
                          "b_rotated.JPG", "gradient.png"]
    assert by["a/b/broken.jpg"]["status"] == "failed" and "cannot read the image" in by["a/b/broken.jpg"]["error"]
    assert "\n" not in by["a/b/broken.jpg"]["error"]
    assert rep["failed"] == [{"path": "a/b/broken.jpg", "error": by["a/b/broken.jpg"]["error"]}]
    assert by["gradient.png"]["status"] == "no_face" and rep["no_face"] == ["gradient.png"]
    assert rep["totals"]["images"] == 6 and rep["totals"]["failed"] == 1 and rep["totals"]["no_face"] == 1
    # The mirror: same tree, format, size; no file for the unreadable one; the no-face photo copied byte for byte.
    assert sorted(outputs(out)) == ["a/001_neutral.jpg", "a/alpha.png", "a/b/002_smiling.jpg", "b_rotated.JPG",
                                    "gradient.png"]
    assert sha256_file(out / "gradient.png") == sha256_file(tree / "gradient.png")
    for rel in ("a/001_neutral.jpg", "a/alpha.png", "a/b/002_smiling.jpg", "b_rotated.JPG"):
        e = by[rel]
        assert e["status"] == "anonymized" and e["faces"] >= 1 and e["anonymized"] >= 1, e
        vf = e["persons"][0]["virtual_face"]
        assert {"chosen", "seed", "candidates"} <= set(vf) and all("distance" in c for c in vf["candidates"])
        assert {"detect", "virtual_face", "swap_paste", "coverage", "write"} <= set(e["timing_ms"])
        assert e["coverage"][0]["result"] in ("swap", "fallback") and "identity_distance" in e["coverage"][0]
        assert e["output_sha256"] == sha256_file(out / rel) and e["input_sha256"] == sha256_file(tree / rel)
        with Image.open(tree / rel) as a, Image.open(out / rel) as b:
            assert b.format == a.format
            assert b.size == (a.size[::-1] if rel == "b_rotated.JPG" else a.size)
            assert 0x0112 not in b.getexif()
        assert not np.array_equal(rgb_of(out / rel), rgb_of(tree / rel))
    # EXIF orientation applied: the output is upright (600 x 800), like the input displays, and its face was found.
    upright, got = rgb_of(tree / "b_rotated.JPG"), rgb_of(out / "b_rotated.JPG")
    assert got.shape == upright.shape == (800, 600, 3) and by["b_rotated.JPG"]["exif_orientation_applied"] == 6
    assert np.abs(got[:100].astype(int) - upright[:100]).mean() < 3  # away from the face: the same picture
    # PNG alpha kept exactly; the swap went into the colour channels.
    with Image.open(tree / "a" / "alpha.png") as a, Image.open(out / "a" / "alpha.png") as b:
        assert b.mode == "RGBA" and np.array_equal(np.asarray(a)[..., 3], np.asarray(b)[..., 3])
        assert not np.array_equal(np.asarray(a)[..., :3], np.asarray(b)[..., :3])
    assert not (out / "notes.txt").exists() and not list(out.rglob("*.tmp"))

    # A second run skips everything (the unreadable file fails again) and rewrites nothing.
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "report.json"}
    t0 = time.perf_counter()
    assert call_infer(args) == 1
    assert time.perf_counter() - t0 < 30
    rep2 = json.loads((out / "report.json").read_text())
    assert rep2["totals"]["this_run"]["processed"] == 0 and rep2["totals"]["this_run"]["skipped_done"] == 5
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert [e["path"] for e in rep2["images"]] == [e["path"] for e in rep["images"]]
    # Other settings into the same --out are refused; so is a folder that is not ours.
    capsys.readouterr()
    assert call_infer(args + ["--seed", "5"]) == 1
    assert "changed: settings.seed" in capsys.readouterr().err
    assert call_infer(["--images", str(tree), "--out", str(tree), "--config", str(tiny_models["config"]),
                       *FAST]) == 1
    assert "holds no KEEP:R photo run" in capsys.readouterr().err


def test_bad_calls(tree, tiny_models, tmp_path, capsys):
    base = ["--config", str(tiny_models["config"]), *FAST]
    for args, msg in ((["--out", str(tmp_path / "o")], "exactly one of --video and --images"),
                      (["--images", str(tree), "--video", "v.mp4", "--out", str(tmp_path / "o")], "exactly one"),
                      (["--images", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], "no such file or folder"),
                      (["--images", str(tree / "notes.txt"), "--out", str(tmp_path / "o")], "not a photo file"),
                      (["--images", str(tree / "a" / "b"), "--out", str(tmp_path / "o"), "--generator",
                        str(tmp_path / "g.pkl")], "missing weights")):
        assert call_infer(base + args) == 1
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(err) == 1 and msg in err[0], err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_one_photo_face_choice_and_strict(tree, tiny_models, tmp_path, capsys):
    """A single file; --face out of range fails that photo; --fallback none --strict leaves the uncovered face and
    exits 2 (the random co-part model's part mask does not cover the face)."""
    base = ["--config", str(tiny_models["config"]), *FAST]
    photo = str(tree / "a" / "001_neutral.jpg")
    assert call_infer(["--images", photo, "--out", str(tmp_path / "o1"), "--face", "1", *base]) == 1
    assert "person index 1 out of range" in capsys.readouterr().err
    assert not (tmp_path / "o1" / "001_neutral.jpg").exists()
    code = call_infer(["--images", photo, "--out", str(tmp_path / "o2"), "--fallback", "none", "--strict", "true",
                       "--coverage.identity", "false", *base])
    rep = json.loads((tmp_path / "o2" / "report.json").read_text())
    assert rep["images"][0]["coverage"][0]["result"] == "left" and rep["totals"]["left"] == 1
    assert code == 2 and "--strict" in capsys.readouterr().err
    assert (tmp_path / "o2" / "001_neutral.jpg").is_file() and rep["images"][0]["status"] == "incomplete"


# ----------------------------------------------------------------------------------------------------------------
# Killed and resumed.


def run_infer(args: list[str], **kw) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen([PY, "infer.py", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_files(photos, tiny_models, tmp_path):
    src = tmp_path / "in"
    for k, name in enumerate(["001_neutral", "001_smiling", "002_neutral", "003_smiling", "004_neutral"]):
        (src / f"d{k % 2}").mkdir(parents=True, exist_ok=True)
        shutil.copy(photos / "london_512" / f"{name}.jpg", src / f"d{k % 2}" / f"{name}.jpg")
    shutil.copy(photos / "misc" / "astronaut_eileen_collins.png", src / "astronaut.png")
    common = ["--images", str(src), "--config", str(tiny_models["config"]), *FAST, "--coverage.identity", "false"]

    ref = tmp_path / "uninterrupted"
    p = run_infer(common + ["--out", str(ref)])
    assert p.wait(timeout=600) == 0, p.stderr.read()

    out = tmp_path / "killed"
    p = run_infer(common + ["--out", str(out)])
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and p.poll() is None and not [
            q for q in out.rglob("*") if q.suffix in (".jpg", ".png")]:
        time.sleep(0.02)
    assert p.poll() is None, "the run ended before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait()
    partial = outputs(out)
    assert 0 < len(partial) < 6 and not (out / "report.json").exists()
    p = run_infer(common + ["--out", str(out)])
    assert p.wait(timeout=600) == 0, p.stderr.read()
    assert outputs(out) == outputs(ref) and len(outputs(ref)) == 6
    assert sorted(q.relative_to(out).as_posix() for q in out.rglob("*")) == \
        sorted(q.relative_to(ref).as_posix() for q in ref.rglob("*"))  # no temporaries left either
    rep = json.loads((out / "report.json").read_text())
    assert rep["totals"]["this_run"]["skipped_done"] >= 1 and rep["totals"]["images"] == 6
