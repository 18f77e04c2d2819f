"""ArcFace IR-SE-50: parity with the reference on the narrow fixture, the full-size key layout, safe loading,
pSp's preprocessing and the photo recogniser."""
from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from safetensors.torch import load_file as load_torch

from keepr.errors import KeeprError, MissingWeightsError
from models.arcface import (
    WHERE_TO_GET,
    ArcFaceRecognizer,
    _adaptive_avg_pool_matrix,
    arcface_input,
    build_arcface,
    load_arcface,
    load_state,
)

OUTPUTS = ["input_layer", "stage1", "stage2", "stage3", "stage4", "embedding_prenorm", "embedding"]


@pytest.fixture(scope="module")
def fx(fixtures_dir):
    return fixtures_dir / "arcface" / "public"


@pytest.fixture(scope="module")
def config(fx):
    return json.loads((fx / "config.json").read_text())


def build_kwargs(config):
    return {k: config[k] for k in ("num_layers", "mode", "widths", "embedding_size", "input_size", "affine")}


@pytest.fixture(scope="module")
def narrow(fx, config):
    return load_arcface(fx / "state_dict.safetensors", **build_kwargs(config))


@pytest.fixture(scope="module")
def spec(fixtures_dir):
    return json.loads((fixtures_dir / "specs" / "ARCFACE_IRSE50_keys.json").read_text())


def check_outputs(out: dict, io: dict) -> None:
    """The fixture's pass rule: max|diff| <= 1e-4 on the embedding, 1e-4 * max(1, max|ref|) elsewhere."""
    for name in OUTPUTS:
        got = out[name].detach().double().numpy()
        sel = io.get(f"sel.{name}")
        if sel is not None:
            got = got[:, :, sel][:, :, :, sel]
        ref = io[name].astype(np.float64)
        assert got.shape == ref.shape, name
        tol = 1e-4 if name == "embedding" else 1e-4 * max(1.0, np.abs(ref).max())
        assert np.abs(got - ref).max() <= tol, (name, np.abs(got - ref).max())


def test_parity_with_reference(narrow, fx):
    io = load_file(str(fx / "io.safetensors"))
    x = torch.from_numpy(io["input"])
    with torch.no_grad():
        out = narrow.forward_features(x)
        emb = narrow(x)
    check_outputs(out, io)
    assert torch.equal(emb, out["embedding"])
    assert torch.allclose(emb.norm(dim=1), torch.ones(len(emb)), atol=1e-6)
    with torch.no_grad():  # one image at a time gives the same embeddings (no batch coupling in eval)
        single = torch.cat([narrow(x[i:i + 1]) for i in range(len(x))])
    assert (single - emb).abs().max() <= 1e-5


def test_pth_state_dict_loads_the_same(narrow, fx, config, tmp_path):
    state = load_torch(str(fx / "state_dict.safetensors"))
    path = tmp_path / "model_ir_se50_narrow.pth"
    torch.save(state, path)
    model = load_arcface(path, **build_kwargs(config))
    x = torch.from_numpy(load_file(str(fx / "io.safetensors"))["input"])
    with torch.no_grad():
        assert torch.equal(model(x), narrow(x))
    # num_batches_tracked is optional (old PyTorch files lack it).
    light = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    model2 = load_state(build_arcface(**build_kwargs(config)), light)
    with torch.no_grad():
        assert torch.equal(model2(x), narrow(x))


def test_full_size_key_list_builds_and_loads(spec):
    model = build_arcface()
    got = [(k, list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in model.state_dict().items()]
    want = [(e["name"], e["shape"], e["dtype"]) for e in spec["keys"]]
    assert got == want  # same names, shapes, dtypes and order as the reference's state_dict()
    assert sum(p.numel() for p in model.parameters()) == spec["num_parameter_elements"]
    # A state dict with exactly those keys (random values) loads, and the values are the ones given.
    gen = torch.Generator().manual_seed(0)
    state = {}
    for name, shape, dtype in want:
        if dtype == "int64":
            state[name] = torch.tensor(7, dtype=torch.int64)
        elif name.endswith("running_var"):
            state[name] = torch.rand(shape, generator=gen) + 0.5
        else:
            state[name] = torch.randn(shape, generator=gen) * 0.01
    load_state(model, state)
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name
    with torch.no_grad():
        e = model(torch.zeros(1, 3, 112, 112).uniform_(-1, 1, generator=gen))
    assert e.shape == (1, 512) and abs(float(e.norm()) - 1.0) < 1e-5


def test_variants_follow_the_spec_notes(spec):
    full = {e["name"] for e in spec["keys"]}
    ir = set(build_arcface(mode="ir").state_dict())
    assert ir == {k for k in full if ".res_layer.5." not in k} and len(full - ir) == 48
    no_affine = set(build_arcface(affine=False).state_dict())
    assert full - no_affine == {"output_layer.4.weight", "output_layer.4.bias"}
    assert build_arcface(input_size=224).output_layer[3].in_features == 512 * 14 * 14


def test_missing_weights_one_line(tmp_path):
    with pytest.raises(MissingWeightsError) as e:
        load_arcface(tmp_path / "model_ir_se50.pth")
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "model_ir_se50.pth") in msg and WHERE_TO_GET in msg


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_and_wrong_files_refused(tmp_path, fixtures_dir):
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.marker = marker
    bad = tmp_path / "evil.pth"
    with open(bad, "wb") as f:
        pickle.dump({"input_layer.0.weight": payload}, f)
    with pytest.raises(KeeprError) as e:
        load_arcface(bad)
    assert "never unpickles" in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()

    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(KeeprError, match="does not hold a state_dict"):
        load_arcface(tmp_path / "tensor.pth")

    truncated = tmp_path / "trunc.pth"
    torch.save({"a": torch.zeros(100)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:50])
    with pytest.raises(KeeprError, match="truncated or corrupt"):
        load_arcface(truncated)

    # The narrow fixture is not a full-size model: shapes are named, on one line.
    with pytest.raises(KeeprError) as e:
        load_arcface(fixtures_dir / "arcface" / "public" / "state_dict.safetensors")
    assert "shape" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(KeeprError, match="missing"):
        load_state(build_arcface(widths=(16, 18, 20, 32), embedding_size=32), {"input_layer.0.weight": torch.zeros(1)})


def test_psp_preprocessing_matches_its_description():
    rng = np.random.default_rng(0)
    aligned = rng.integers(0, 256, size=(256, 256, 3), dtype=np.uint8)
    x = arcface_input(aligned)
    assert x.shape == (1, 3, 112, 112) and x.dtype == torch.float32
    # By hand: [-1, 1] mapping, crop rows 35..222 / cols 32..219, windows floor(i*188/112)..ceil((i+1)*188/112)-1.
    f = (aligned.astype(np.float64) / 255.0 - 0.5) / 0.5
    crop = f[35:223, 32:220]
    m = _adaptive_avg_pool_matrix(188, 112)
    assert m[0, :2].tolist() == [0.5, 0.5] and m[1, 1:4].round(6).tolist() == [round(1 / 3, 6)] * 3
    want = np.einsum("ih,hwc,jw->cij", m, crop, m, optimize=True)
    assert np.abs(x[0].double().numpy() - want).max() < 1e-5
    # Float input already in [-1, 1] takes the same path.
    t = torch.from_numpy(f).permute(2, 0, 1)[None].float()
    assert (arcface_input(t) - x).abs().max() < 1e-6


def test_recognizer_on_a_photo(narrow, fixtures_dir):
    from anonymizer.faces import detect_faces
    from keepr.images import load_image

    rec = ArcFaceRecognizer(model=narrow)
    rgb = load_image(fixtures_dir.parents[1] / "data" / "gallery" / "london" / "001_neutral.jpg")
    e = rec.embed_face(rgb)
    assert e.shape == (32,) and abs(np.linalg.norm(e) - 1) < 1e-6
    face = detect_faces(rgb)[0]
    assert np.array_equal(rec.embed_face(rgb, face.landmarks), e)
    assert rec.similarity(e, e) == pytest.approx(1.0)
    assert rec.embed_face(np.zeros((200, 200, 3), np.uint8)) is None
    crops = np.stack([np.full((112, 112, 3), 128, np.uint8), np.zeros((112, 112, 3), np.uint8)])
    assert rec.embed(crops).shape == (2, 32)
    with pytest.raises(KeeprError, match="weights path"):
        ArcFaceRecognizer()


def test_eval_run_arcface_column(narrow, fixtures_dir, monkeypatch, tmp_path, capsys):
    """eval.run --arcface: identity similarity of original and anonymized face, aligned alike; missing weights fail
    at once with a one-line error."""
    from anonymizer.fallback import apply_region
    from eval import metrics as M
    from eval import run
    from eval import scoring as R
    from keepr.images import load_image

    monkeypatch.setattr(R, "arcface_recognizer", lambda path: ArcFaceRecognizer(model=narrow))
    frame = load_image(fixtures_dir.parents[1] / "data" / "gallery" / "london" / "002_neutral.jpg")
    ref = M.FaceMeasurer().measure(frame, None)
    assert ref.detected
    frames, reference = [frame, frame], [ref, M.FaceMeasurement.missing()]
    emb = R._arcface_embeddings("w.pth", frames, reference)
    assert emb[1] is None and emb[0].shape == (32,)
    assert R.arcface_similarity("w.pth", frames, reference, emb) == pytest.approx(1.0)
    black = [apply_region(frame, ref.box, "blackbox")] * 2
    assert R.arcface_similarity("w.pth", black, reference, emb) < 1.0 - 1e-4
    assert R.ARCFACE_UNAVAILABLE.startswith("unavailable")
    monkeypatch.undo()
    with pytest.raises(SystemExit):
        run.main(["--videos", str(fixtures_dir.parents[1] / "data" / "samples" / "lrwp9a.mpg"), "--methods", "none",
                "--out", str(tmp_path / "out"), "--arcface", str(tmp_path / "model_ir_se50.pth"), "--no_progress"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model_ir_se50.pth" in err and WHERE_TO_GET in err
    assert not (tmp_path / "out").exists()


def test_eval_encoder_arcface(narrow, fixtures_dir, tmp_path, capsys):
    """eval.encoder --arcface: pSp's identity similarity of an aligned photo and its re-synthesis (any resolution)."""
    import cv2

    from anonymizer.faces import align_face, detect_faces
    from eval import encoder as E
    from keepr.images import load_image

    rec = ArcFaceRecognizer(model=narrow)
    rgb = load_image(fixtures_dir.parents[1] / "data" / "gallery" / "london" / "003_neutral.jpg")
    aligned = align_face(rgb, detect_faces(rgb)[0].landmarks, 256).image
    assert E.arcface_similarity(rec, aligned, aligned) == pytest.approx(1.0)
    small = cv2.resize(aligned, (64, 64), interpolation=cv2.INTER_AREA)
    sim = E.arcface_similarity(rec, small, small[::-1].copy())
    assert -1.0 <= sim < 1.0
    rows = [{"photo": "a.jpg", "face_in_photo": True, "identity_distance": "", "arcface_similarity": "0.5000"},
            {"photo": "b.jpg", "face_in_photo": False, "identity_distance": "", "arcface_similarity": ""}]
    paths = E.write_report(tmp_path / "rep", None, rows, [("a.jpg", aligned, aligned)], {})
    assert "mean 0.5000 over 1 photos" in paths["markdown"].read_text()
    rows[0]["arcface_similarity"] = E.ARCFACE_UNAVAILABLE
    paths = E.write_report(tmp_path / "rep2", None, rows, [], {})
    assert "unavailable (no weights: pass --arcface" in paths["markdown"].read_text()
    with pytest.raises(SystemExit):
        E.main(["--encoder", str(tmp_path / "enc.safetensors"), "--out", str(tmp_path / "out"),
                "--arcface", str(tmp_path / "model_ir_se50.pth")])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model_ir_se50.pth" in err and not (tmp_path / "out").exists()
