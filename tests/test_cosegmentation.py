"""Co-part segmentation part swap: parity with the authors' code, checkpoint layouts, batching, tiny models."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from keepr.errors import KeeprError, MissingWeightsError
from models.cosegmentation import PartSwapper, build_model, load_cosegmentation, make_tiny_cosegmentation
from models.cosegmentation.loader import checkpoint_state_dict, load_state

CASES = {  # output name -> (swap_index, hard, mask_from, align_corners, recorded blend mask)
    "A_hard_driving_acT": ([1, 2, 5], True, "driving", True, "blend_mask_A_hard_driving"),
    "A_soft_driving_acF": ([1, 2, 5], False, "driving", False, "blend_mask_A_soft_driving"),
    "A_soft_driving_acT": ([1, 2, 5], False, "driving", True, "blend_mask_A_soft_driving"),
    "A_soft_source_acT": ([1, 2, 5], False, "source", True, "blend_mask_A_soft_source_warped_acT"),
    "B_soft_driving_acT": ([7, 9], False, "driving", True, "blend_mask_B_soft_driving"),
}


@pytest.fixture(scope="module")
def fx(fixtures_dir):
    return fixtures_dir / "cosegmentation" / "public"


@pytest.fixture(scope="module")
def inputs(fx):
    src = torch.from_numpy(np.load(fx / "source.npy")).permute(2, 0, 1)[None]
    drv = torch.from_numpy(np.load(fx / "driving.npy")).permute(0, 3, 1, 2)
    return src, drv


@pytest.fixture(scope="module", params=["checkpoint_logger.pth.tar", "checkpoint_fomm.pth.tar"])
def model(request, fx):
    return load_cosegmentation(fx / request.param, fx / "config.yaml")


def ref(fx, name):
    return torch.from_numpy(np.load(fx / f"{name}.npy"))


def test_segmentation_parity(model, fx, inputs):
    src, drv = inputs
    for who, x in (("source", src), ("driving", drv)):
        out = model.segment(x)
        assert (out["segmentation"] - ref(fx, f"seg_{who}_segmentation")).abs().max() <= 5e-5
        assert (out["shift"] - ref(fx, f"seg_{who}_shift")).abs().max() <= 2e-5
        assert (out["affine"] - ref(fx, f"seg_{who}_affine")).abs().max() <= 1e-5


@pytest.mark.parametrize("case", sorted(CASES))
def test_part_swap_parity(model, fx, inputs, case):
    src, drv = inputs
    idx, hard, mask_from, ac, mask_name = CASES[case]
    cache = model.prepare_source(src)
    res = model.swap_batch(cache, drv, idx, hard=hard, mask_from=mask_from, align_corners=ac)
    err = (res["prediction"].permute(0, 2, 3, 1) - ref(fx, f"out_{case}")).abs()
    assert err.max() <= 5e-4 and err.mean() <= 2e-5, (err.max(), err.mean())
    assert (res["deformation"] - ref(fx, "deformation")).abs().max() <= 5e-5
    assert (res["visibility"] - ref(fx, "visibility")).abs().max() <= 5e-5
    if hard:
        assert torch.equal(res["blend_mask"], ref(fx, mask_name))
    else:
        assert (res["blend_mask"] - ref(fx, mask_name)).abs().max() <= 5e-5
    # The public entry point gives the same frames.
    out = model.part_swap(src, drv, idx, hard=hard, mask_from=mask_from, align_corners=ac)
    assert (out - res["prediction"]).abs().max() <= 1e-5


def test_source_mask_intermediates(model, fx, inputs):
    src, drv = inputs
    cache = model.prepare_source(src)
    unwarped = cache.seg["segmentation"][:, [1, 2, 5]].sum(dim=1, keepdim=True)
    assert (unwarped - ref(fx, "blend_mask_A_soft_source_unwarped")).abs().max() <= 5e-5
    res = model.swap_batch(cache, drv, [1, 2, 5], mask_from="source", align_corners=False)
    assert (res["blend_mask"] - ref(fx, "blend_mask_A_soft_source_warped_acF")).abs().max() <= 5e-5


def test_variants_differ(model, inputs):
    src, drv = inputs
    base = model.part_swap(src, drv, [1, 2, 5])
    other = model.part_swap(src, drv, [1, 2, 5], align_corners=False)
    assert (base - other).abs().mean() > 0.01


def test_batch_size_independent_and_mask(model, inputs):
    src, drv = inputs
    one, m1 = PartSwapper(model, src, [1, 2, 5], batch_size=1)(drv, return_mask=True)
    three, m3 = PartSwapper(model, src, [1, 2, 5], batch_size=3)(drv, return_mask=True)
    assert one.shape == three.shape == drv.shape
    assert (one - three).abs().max() <= 1e-5
    assert m1.shape == (3, 1, 128, 128) and (m1 - m3).abs().max() <= 1e-5
    assert 0 <= m1.min() and m1.max() <= 1 and m1.std() > 0
    # Two batches of 2 + 1 frames agree with one batch too.
    two = PartSwapper(model, src, [1, 2, 5], batch_size=2)(drv)
    assert (two - three).abs().max() <= 1e-5


def test_zip_resave_loads(fx, tmp_path, inputs):
    ckpt = torch.load(fx / "checkpoint_fomm.pth.tar", map_location="cpu", weights_only=True)
    ckpt["dense_motion_network"] = {"x": torch.zeros(1)}  # Unknown extras are ignored.
    ckpt["generator"]["dense_motion_network.mask.weight"] = torch.zeros(11, 108, 7, 7)
    path = tmp_path / "resaved.pth.tar"
    torch.save(ckpt, path)  # Zip format.
    a = load_cosegmentation(path, fx / "config.yaml")
    b = load_cosegmentation(fx / "checkpoint_logger.pth.tar", fx / "config.yaml")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_missing_keys_listed(fx, tmp_path):
    ckpt = torch.load(fx / "checkpoint_logger.pth.tar", map_location="cpu", weights_only=True)
    del ckpt["segmentation_module"]["affine.weight"]
    del ckpt["reconstruction_module"]["final.bias"]
    path = tmp_path / "broken.pth.tar"
    torch.save(ckpt, path)
    with pytest.raises(KeeprError, match="missing") as info:
        load_cosegmentation(path, fx / "config.yaml")
    msg = str(info.value)
    assert "segmentation_module.affine.weight" in msg and "reconstruction_module.final.bias" in msg and str(path) in msg


def test_missing_file_and_bad_files(fx, tmp_path):
    with pytest.raises(MissingWeightsError, match="motion-cosegmentation"):
        load_cosegmentation(tmp_path / "vox-10segments.pth.tar", "configs/cosegmentation/vox-256-10segments.yaml")
    junk = tmp_path / "junk.pth.tar"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(KeeprError, match="junk.pth.tar"):
        load_cosegmentation(junk, fx / "config.yaml")
    other = tmp_path / "other.pth.tar"
    torch.save({"model": {}}, other)
    with pytest.raises(KeeprError, match="unknown checkpoint layout"):
        load_cosegmentation(other, fx / "config.yaml")


def _spec_tensors(entries):
    gen = torch.Generator().manual_seed(0)
    out = {}
    for e in entries:
        if e["dtype"] == "int64":
            out[e["key"]] = torch.zeros(e["shape"], dtype=torch.int64)
        else:
            out[e["key"]] = torch.randn(e["shape"], generator=gen)
    return out


@pytest.mark.parametrize("k", [5, 10, 15])
def test_full_size_key_lists(fixtures_dir, k):
    specs = fixtures_dir / "specs"
    fomm_specs = json.loads((specs / "cosegmentation_vox_fomm_layout_keys.json").read_text())
    fomm = fomm_specs["configs"][f"vox-256-sem-{k}segments"]
    model = build_model(f"configs/cosegmentation/vox-256-{k}segments.yaml")
    assert model.img_size == 256 and model.num_segments == k
    rename = {"kp.": "shift.", "jacobian.": "affine.", "semantic_seg.": "segmentation."}
    expect = {f"reconstruction_module.{e['key']}": e["shape"] for e in fomm["generator"]}
    for e in fomm["kp_detector"]:
        key = e["key"]
        for old, new in rename.items():
            key = new + key[len(old):] if key.startswith(old) else key
        expect[f"segmentation_module.{key}"] = e["shape"]
    got = {key: list(v.shape) for key, v in model.state_dict().items()}
    assert got == expect
    layouts = {"fomm": {"generator": _spec_tensors(fomm["generator"]),
                        "kp_detector": _spec_tensors(fomm["kp_detector"]),
                        "optimizer_generator": {"state": {}, "param_groups": []}}}
    if k == 10:
        logger = json.loads((specs / "cosegmentation_vox10_keys.json").read_text())
        layouts["logger"] = {"segmentation_module": _spec_tensors(logger["segmentation_module"]),
                             "reconstruction_module": _spec_tensors(logger["reconstruction_module"]),
                             "optimizer_segmentation_module": {"state": {}, "param_groups": []}, "epoch": 4}
        counts = logger["param_counts"]["vox-256-sem-10segments.yaml"]
        assert sum(p.numel() for p in model.segmentation_module.parameters()) == counts["segmentation_module_params"]
        n_params = sum(p.numel() for p in model.reconstruction_module.parameters())
        assert n_params == counts["reconstruction_module_params"]
    for ckpt in layouts.values():
        load_state(model, checkpoint_state_dict(ckpt))
        src = ckpt.get("generator", ckpt.get("reconstruction_module"))
        assert torch.equal(model.reconstruction_module.state_dict()["final.weight"], src["final.weight"])


def test_full_size_legacy_file_loads(tmp_path):
    """A full-size vox-10 checkpoint in torch's legacy format, logger layout, read through the public loader."""
    cfg = "configs/cosegmentation/vox-256-10segments.yaml"
    ref_model = make_tiny_cosegmentation(cfg, seed=3)
    ckpt = {"segmentation_module": ref_model.segmentation_module.state_dict(),
            "reconstruction_module": ref_model.reconstruction_module.state_dict(), "epoch": 4}
    path = tmp_path / "vox-10segments.pth.tar"
    torch.save(ckpt, path, _use_new_zipfile_serialization=False)
    model = load_cosegmentation(path, cfg)
    for (ka, va), (kb, vb) in zip(model.state_dict().items(), ref_model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_tiny_model_deterministic_and_saves(tmp_path, inputs):
    a, b, c = make_tiny_cosegmentation(seed=0), make_tiny_cosegmentation(seed=0), make_tiny_cosegmentation(seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    assert a.img_size == 128 and a.num_segments == 10
    path = tmp_path / "cosegmentation_tiny.pth.tar"
    a.save(path)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert {"segmentation_module", "reconstruction_module"} <= set(raw)
    loaded = load_cosegmentation(path, "configs/cosegmentation/tiny.yaml")
    src, drv = inputs
    out_a = a.part_swap(src, drv, [1, 2, 5])
    out_l = loaded.part_swap(src, drv, [1, 2, 5])
    assert torch.equal(out_a, out_l)
    assert torch.isfinite(out_a).all() and 0 <= out_a.min() and out_a.max() <= 1 and out_a.std() > 0.01
    # The swapped parts change the frame; an empty-ish swap set (background only) would differ again.
    plain = a.part_swap(src, drv, [3])
    assert (plain - out_a).abs().mean() > 1e-4


def test_bad_arguments(inputs):
    model = make_tiny_cosegmentation(seed=0)
    src, drv = inputs
    with pytest.raises(ValueError, match="swap_index"):
        model.part_swap(src, drv, [11])
    with pytest.raises(ValueError, match="mask_from"):
        model.part_swap(src, drv, [1], mask_from="target")
    with pytest.raises(ValueError, match="source"):
        model.part_swap(drv, drv, [1])


def test_folded_generator_matches_modules(fx, inputs):
    """The folded inference path (BN folded, phase-split up blocks) equals the plain modules."""
    model = load_cosegmentation(fx / "checkpoint_logger.pth.tar", fx / "config.yaml")
    src, drv = inputs
    rec, gen = model.reconstruction_module, model.generator()
    assert gen is not rec
    feat = rec.encode(drv)
    assert (gen.encode(drv) - feat).abs().max() <= 1e-5
    assert (gen.decode(feat) - rec.decode(feat)).abs().max() <= 1e-5
    model.fold_generator = False
    plain = model.part_swap(src, drv, [1, 2, 5])
    assert (plain.permute(0, 2, 3, 1) - ref(fx, "out_A_soft_driving_acT")).abs().max() <= 5e-4
    model.fold_generator = True
    assert (model.part_swap(src, drv, [1, 2, 5]) - plain).abs().max() <= 5e-5
    # Changing a weight rebuilds the folded form.
    with torch.no_grad():
        rec.final.bias.add_(1.0)
    assert (model.generator().decode(feat) - rec.decode(feat)).abs().max() <= 1e-5
