"""StyleGAN2 generator: parity with the official implementation in all three checkpoint formats, safe loading,
full-size key lists, the tiny config."""
from __future__ import annotations

import contextlib
import json
import pickle
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from keepr.errors import KeeprError, MissingWeightsError
from models.stylegan2 import Generator, load_generator, make_tiny_generator
from models.stylegan2.loaders import (
    KEEPR_FORMAT,
    KEEPR_FORMAT_VERSION,
    generator_from_rosinality,
    generator_from_state_dict,
    normalize_init_kwargs,
    nvlabs_to_rosinality,
    rosinality_to_nvlabs,
)
from models.stylegan2.safe_pickle import PersistentRecord, flatten_record, safe_load_network_pickle

WS_TOL = 1e-5
IMG_TOL = 1e-4


@pytest.fixture(scope="module")
def pdir(fixtures_dir) -> Path:
    return fixtures_dir / "stylegan2" / "P"


@pytest.fixture(scope="module")
def pconfig(pdir) -> dict:
    return json.loads((pdir / "config.json").read_text())


@pytest.fixture(scope="module")
def io(pdir) -> dict:
    return load_file(str(pdir / "io.safetensors"))


@pytest.fixture(scope="module")
def reference_state(pdir) -> dict:
    return load_file(str(pdir / "state_dict.safetensors"))


@pytest.fixture(scope="module")
def keepr_file(pdir, tmp_path_factory) -> Path:
    """P in KEEP:R's own format, written by Generator.save from the pickle."""
    path = tmp_path_factory.mktemp("keepr") / "P.safetensors"
    load_generator(pdir / "network.pkl").save(path)
    return path


def _check_parity(G: Generator, io: dict, cases=("psi1", "psi0p7")) -> None:
    psis = {"psi1": 1.0, "psi0p7": 0.7}
    with torch.no_grad():
        for case in cases:
            ws = G.mapping(io["z"], None, truncation_psi=psis[case])
            assert (ws - io[f"ws_{case}"]).abs().max().item() <= WS_TOL, case
            img = G.synthesis(io[f"ws_{case}"], noise_mode="const")
            assert img.shape == io[f"img_{case}"].shape
            assert (img - io[f"img_{case}"]).abs().max().item() <= IMG_TOL, case
            img_full = G(io["z"], truncation_psi=psis[case], noise_mode="const")
            assert (img_full - io[f"img_{case}"]).abs().max().item() <= IMG_TOL, case
        img = G.synthesis(io["ws_psi1"], noise_mode="none")
        assert (img - io["img_psi1_noise_none"]).abs().max().item() <= IMG_TOL


# ----------------------------------------------------------------------------------------------------------------
# Parity in every format.

@pytest.mark.parametrize("name", ["network.pkl", "rosinality_ckpt.pt", "state_dict.safetensors", "keepr"])
def test_parity_all_formats(name, pdir, io, keepr_file, reference_state):
    G = load_generator(keepr_file if name == "keepr" else pdir / name)
    assert not G.training and not any(p.requires_grad for p in G.parameters())
    assert (G.z_dim, G.w_dim, G.num_ws, G.img_resolution, G.img_channels) == (64, 64, 8, 32, 3)
    assert torch.equal(G.w_avg, io["w_avg"]) and G.w_avg is G.mapping.w_avg
    sd = G.state_dict()
    assert set(sd) == set(reference_state)
    for key, value in reference_state.items():
        assert torch.equal(sd[key], value), key
    _check_parity(G, io)


def test_rosinality_state_dict_without_latent_avg(pdir, io):
    """A bare rosinality-named state dict has no latent_avg: w_avg is estimated, untruncated outputs are exact."""
    G = load_generator(pdir / "state_dict_rosinality.safetensors")
    _check_parity(G, io, cases=("psi1",))
    assert (G.w_avg - io["w_avg"]).abs().max().item() < 0.1  # estimate of the same mean


def test_keys_match_official(pconfig):
    G = Generator(**pconfig["init_kwargs"])
    assert [(k, list(v.shape)) for k, v in G.state_dict().items()] == [(k, s) for k, s in pconfig["state_dict_keys"]]
    assert G.num_ws == pconfig["num_ws"]
    assert sum(p.numel() for p in G.parameters()) + sum(b.numel() for b in G.buffers()) >= pconfig["num_params"]


@pytest.mark.parametrize("conv_clamp", [None, 0.5])
def test_execution_paths_agree(pdir, pconfig, reference_state, io, conv_clamp):
    """Fast (default), official fused and official unfused paths; batch 1 and 4; with and without autograd."""
    kwargs = json.loads(json.dumps(pconfig["init_kwargs"]))
    kwargs["synthesis_kwargs"]["conv_clamp"] = conv_clamp
    G = generator_from_state_dict(reference_state, normalize_init_kwargs(kwargs), "P").eval()
    ws = io["ws_psi0p7"]
    with torch.no_grad():
        ref = G.synthesis(ws, fused_modconv=True)
        for fused in (None, False):
            assert (G.synthesis(ws, fused_modconv=fused) - ref).abs().max().item() < 1e-5, fused
        for i in range(2):  # batch of one takes the modulated-weights branch
            assert (G.synthesis(ws[i:i + 1]) - ref[i:i + 1]).abs().max().item() < 1e-5
    if conv_clamp is None:
        assert (ref - io["img_psi0p7"]).abs().max().item() <= IMG_TOL
    else:
        assert (ref - io["img_psi0p7"]).abs().max().item() > 1e-2  # the clamp is applied
    w = ws.clone().requires_grad_(True)
    out = G.synthesis(w)
    assert (out.detach() - ref).abs().max().item() < 1e-5
    out.square().mean().backward()
    grad_fast = w.grad.clone()
    w.grad = None
    G.synthesis(w, fused_modconv=True).square().mean().backward()
    assert torch.allclose(grad_fast, w.grad, rtol=1e-4, atol=1e-6)


def test_pickle_protocol2_numpy_scalars(tmp_path):
    """Protocol-2 pickles (``_codecs.encode`` bytes, ``__builtin__.set``) and numpy scalars load through the
    allow-list."""
    import io as io_

    import numpy as np

    from models.stylegan2.safe_pickle import SafeNetworkUnpickler

    data = {"a": np.float64(0.25), "b": np.float32(2.0), "c": np.int64(3), "s": {1, 2}, "raw": b"\x00\xff",
            "t": torch.arange(4.0)}
    out = SafeNetworkUnpickler(io_.BytesIO(pickle.dumps(data, protocol=2)), "p2").load()
    assert out["a"] == 0.25 and out["b"] == 2.0 and out["c"] == 3 and out["s"] == {1, 2} and out["raw"] == b"\x00\xff"
    assert torch.equal(out["t"], data["t"])


def test_pickle_uses_g_ema_not_g(pdir, reference_state):
    data = safe_load_network_pickle(pdir / "network.pkl")
    assert {"G", "D", "G_ema"} <= set(data)
    g = flatten_record(data["G"], "G")
    g_ema = flatten_record(data["G_ema"], "G_ema")
    differing = [k for k in g if not torch.equal(g[k], g_ema[k])]
    assert differing, "fixture G and G_ema should differ"
    sd = load_generator(pdir / "network.pkl").state_dict()
    for key in differing:
        assert torch.equal(sd[key], reference_state[key]) and not torch.equal(sd[key], g[key])


def test_save_load_round_trip(keepr_file, pdir, io, tmp_path):
    from safetensors import safe_open

    with safe_open(str(keepr_file), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == KEEPR_FORMAT and meta["format_version"] == KEEPR_FORMAT_VERSION
    G = load_generator(keepr_file)
    assert json.loads(meta["init_kwargs"]) == G.init_kwargs
    out = tmp_path / "again.safetensors"
    G.save(out)
    assert [p.name for p in tmp_path.iterdir()] == ["again.safetensors"]  # atomic: no temporary left
    G2 = load_generator(out)
    for (k, a), (k2, b) in zip(G.state_dict().items(), G2.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    # Generator(**init_kwargs) rebuilds the same architecture.
    assert list(Generator(**G.init_kwargs).state_dict()) == list(G.state_dict())


# ----------------------------------------------------------------------------------------------------------------
# Full-size official key lists.

def _random_state(keys: list[dict]) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {k["key"]: torch.randn(k["shape"], generator=gen) for k in keys}


def test_ffhq1024_nvlabs_keys_build_and_load(fixtures_dir):
    spec = json.loads((fixtures_dir / "specs" / "stylegan2_ffhq1024_nvlabs_keys.json").read_text())
    state = _random_state(spec["keys"])
    G = generator_from_state_dict(state, normalize_init_kwargs(spec["init_kwargs"]), "ffhq1024-nvlabs")
    assert G.num_ws == spec["num_ws"] == 18
    sd = G.state_dict()
    assert [k["key"] for k in spec["keys"]] == list(sd) or set(k["key"] for k in spec["keys"]) == set(sd)
    assert sum(p.numel() for p in G.parameters()) == spec["num_params"]
    assert torch.equal(sd["synthesis.b1024.torgb.weight"], state["synthesis.b1024.torgb.weight"])
    with torch.no_grad():
        ws = G.mapping(torch.randn(1, 512), truncation_psi=0.7)
    assert ws.shape == (1, 18, 512)


def test_ffhq1024_rosinality_keys_build_and_load(fixtures_dir):
    spec = json.loads((fixtures_dir / "specs" / "stylegan2_ffhq1024_rosinality_keys.json").read_text())
    nv_spec = json.loads((fixtures_dir / "specs" / "stylegan2_ffhq1024_nvlabs_keys.json").read_text())
    state = _random_state(spec["keys"])
    blur = torch.tensor([1.0, 3.0, 3.0, 1.0])
    for key in state:  # filter buffers are constants, not weights: rosinality's make_kernel(blur) * 4
        if key.endswith((".blur.kernel", ".upsample.kernel")):
            state[key] = torch.outer(blur, blur) / 64 * 4
    latent_avg = torch.randn(spec["latent_avg_shape"])
    G = generator_from_rosinality(state, latent_avg, "ffhq1024-rosinality")
    expected = normalize_init_kwargs(nv_spec["init_kwargs"])
    got = G.init_kwargs
    assert (got["img_resolution"], got["z_dim"], got["w_dim"], G.num_ws) == (1024, 512, 512, spec["n_latent"])
    assert got["mapping_kwargs"]["num_layers"] == spec["ctor"]["n_mlp"] == 8
    assert got["mapping_kwargs"]["lr_multiplier"] == expected["mapping_kwargs"]["lr_multiplier"]
    for key in ("channel_base", "channel_max", "conv_clamp", "resample_filter"):
        assert got["synthesis_kwargs"][key] == expected["synthesis_kwargs"][key], key
    sd = G.state_dict()
    assert set(sd) == {k["key"] for k in nv_spec["keys"]}
    assert sum(p.numel() for p in G.parameters()) == spec["num_params"]
    assert torch.equal(sd["mapping.w_avg"], latent_avg)
    assert torch.equal(sd["synthesis.b4.const"], state["input.input"][0])
    assert torch.equal(sd["synthesis.b1024.conv1.weight"], state["convs.15.conv.weight"][0])
    assert torch.equal(sd["synthesis.b1024.conv1.noise_const"], state["noises.noise_16"][0, 0])
    assert torch.equal(sd["synthesis.b1024.torgb.bias"], state["to_rgbs.7.bias"].reshape(-1))


def test_rosinality_renaming_round_trip(pconfig, reference_state, pdir):
    ros = load_file(str(pdir / "state_dict_rosinality.safetensors"))
    back = nvlabs_to_rosinality(reference_state, pconfig["init_kwargs"])
    assert set(back) == set(ros)
    for key in ros:
        assert torch.allclose(back[key], ros[key]), key
    nv = rosinality_to_nvlabs(ros, 2, 32, "P")
    for key, value in nv.items():
        assert torch.equal(value, reference_state[key]), key


# ----------------------------------------------------------------------------------------------------------------
# Safe loading and clear failures.

@contextlib.contextmanager
def _fake_nvlabs_modules():
    """Register stand-ins for torch_utils.persistence / dnnlib.util so a test can *write* NVlabs-style pickles."""
    persistence = types.ModuleType("torch_utils.persistence")
    util = types.ModuleType("dnnlib.util")

    def _reconstruct_persistent_obj(meta):  # never called: the files are only read by KEEP:R's loader
        raise AssertionError("executed")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    util.EasyDict = type("EasyDict", (dict,), {"__module__": "dnnlib.util"})
    saved = {k: sys.modules.get(k) for k in ("torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util")}
    sys.modules.update({"torch_utils": types.ModuleType("torch_utils"), "torch_utils.persistence": persistence,
                        "dnnlib": types.ModuleType("dnnlib"), "dnnlib.util": util})
    try:
        yield persistence, util
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def _write_nvlabs_pickle(path: Path, data) -> None:
    """Pickle records / dicts the way NVlabs does (persistent objects + EasyDicts), for tests only."""
    with _fake_nvlabs_modules() as (persistence, util):
        class Persistent:
            def __init__(self, rec):
                self.rec = rec

            def __reduce__(self):
                meta = dict(type="class", version=6, module_src="raise RuntimeError('executed')",
                            class_name=self.rec.class_name, state=convert(self.rec.state))
                return persistence._reconstruct_persistent_obj, (meta,)

        def convert(obj):
            if isinstance(obj, PersistentRecord):
                return Persistent(obj)
            if type(obj).__name__ == "EasyDict":
                return util.EasyDict({k: convert(v) for k, v in obj.items()})
            if isinstance(obj, dict):
                return type(obj)((k, convert(v)) for k, v in obj.items())
            return obj

        with open(path, "wb") as f:
            pickle.dump(convert(data), f, protocol=4)


class _Evil:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


@pytest.mark.parametrize("how", ["os.system", "builtins.exec", "nested"])
def test_malicious_pickle_refused_without_side_effect(how, tmp_path, pdir):
    import os

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    if how == "os.system":
        payload = {"G_ema": _Evil(os.system, f"touch {marker}")}
        with open(path, "wb") as f:
            pickle.dump(payload, f)
        global_name = "system"
    elif how == "builtins.exec":
        with open(path, "wb") as f:
            pickle.dump({"G_ema": _Evil(exec, f"open({str(marker)!r}, 'w').close()")}, f)
        global_name = "builtins.exec"
    else:  # a forbidden global deep inside an otherwise valid network pickle
        data = safe_load_network_pickle(pdir / "network.pkl")
        data["G_ema"].state["_modules"]["mapping"].state["evil"] = _Evil(exec, f"open({str(marker)!r}, 'w').close()")
        _write_nvlabs_pickle(path, data)
        global_name = "builtins.exec"
    with pytest.raises(KeeprError) as err:
        load_generator(path)
    assert str(path) in str(err.value) and global_name in str(err.value) and "refusing" in str(err.value)
    assert not marker.exists()


def test_rewritten_pickle_loads_and_stylegan3_layout(tmp_path, pdir, io):
    """Our test writer produces loadable pickles; a stylegan3-repo layout (flat synthesis kwargs) loads too."""
    data = safe_load_network_pickle(pdir / "network.pkl")
    kwargs = data["G_ema"].state["_init_kwargs"]
    flat = type(kwargs)({k: v for k, v in kwargs.items() if k != "synthesis_kwargs"})
    flat.update(kwargs["synthesis_kwargs"])
    flat["fused_modconv_default"] = "inference_only"
    data["G_ema"].state["_init_kwargs"] = flat
    path = tmp_path / "sg3_layout.pkl"
    _write_nvlabs_pickle(path, data)
    _check_parity(load_generator(path), io, cases=("psi0p7",))


def test_stylegan3_generator_refused(tmp_path, pdir):
    data = safe_load_network_pickle(pdir / "network.pkl")
    synth = data["G_ema"].state["_modules"]["synthesis"]
    synth.state["_modules"]["input"] = PersistentRecord(
        "SynthesisInput", 6, {"_parameters": {"weight": torch.zeros(4, 4)}, "_buffers": {}, "_modules": {}})
    path = tmp_path / "stylegan3-t.pkl"
    _write_nvlabs_pickle(path, data)
    with pytest.raises(KeeprError, match="StyleGAN3"):
        load_generator(path)


def test_tensorflow_pickle_refused(tmp_path):
    path = tmp_path / "tf.pkl"
    path.write_bytes(b"\x80\x02cdnnlib.tflib.network\nNetwork\nq\x00)\x81q\x01}q\x02b.")
    with pytest.raises(KeeprError, match="TensorFlow pickle: convert it first"):
        load_generator(path)


@pytest.mark.parametrize("name", ["network.pkl", "rosinality_ckpt.pt", "keepr"])
def test_truncated_file_refused(name, pdir, keepr_file, tmp_path):
    src = keepr_file if name == "keepr" else pdir / name
    data = src.read_bytes()
    path = tmp_path / src.name
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(KeeprError, match="truncated or corrupt") as err:
        load_generator(path)
    assert str(path) in str(err.value)


def test_empty_and_unknown_files_refused(tmp_path):
    for name, content, match in [("empty.pkl", b"", "empty file"),
                                 ("text.pt", b"hello, this is not a checkpoint", "unknown file format")]:
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(KeeprError, match=match) as err:
            load_generator(path)
        assert str(path) in str(err.value)


def test_missing_file_says_where_to_get_it(tmp_path):
    with pytest.raises(MissingWeightsError, match="ffhq.pkl") as err:
        load_generator(tmp_path / "ffhq.pkl")
    assert isinstance(err.value, KeeprError)


def test_wrong_shapes_and_keys_refused(reference_state, pconfig, tmp_path):
    metadata = {"format": KEEPR_FORMAT, "format_version": KEEPR_FORMAT_VERSION,
                "init_kwargs": json.dumps(pconfig["init_kwargs"])}
    bad = dict(reference_state)
    bad["synthesis.b8.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    path = tmp_path / "wrong_shape.safetensors"
    save_file(bad, str(path), metadata=metadata)
    with pytest.raises(KeeprError, match=r"wrong shapes: synthesis\.b8\.conv1\.weight \[64, 64, 1, 1\]") as err:
        load_generator(path)
    assert str(path) in str(err.value)

    bad = {k: v for k, v in reference_state.items() if k != "mapping.fc1.bias"}
    bad["mapping.fc9.weight"] = torch.zeros(1)
    path = tmp_path / "wrong_keys.safetensors"
    save_file(bad, str(path), metadata=metadata)
    with pytest.raises(KeeprError, match=r"missing keys: mapping\.fc1\.bias.*unexpected keys: mapping\.fc9\.weight"):
        load_generator(path)


def test_unsupported_config_refused(pconfig):
    for change, match in [({"architecture": "resnet"}, "architecture"), ({"magnitude_ema_beta": 0.99}, "magnitude")]:
        kwargs = json.loads(json.dumps(pconfig["init_kwargs"]))
        kwargs["synthesis_kwargs"].update(change)
        with pytest.raises(KeeprError, match=match):
            normalize_init_kwargs(kwargs, "cfg")


# ----------------------------------------------------------------------------------------------------------------
# Behaviour: tiny config, truncation, noise.

@pytest.fixture(scope="module")
def tiny():
    return make_tiny_generator(seed=0)


def test_tiny_generator_deterministic(tiny):
    assert (tiny.z_dim, tiny.w_dim, tiny.num_ws, tiny.img_resolution) == (64, 64, 10, 64)
    assert [k for k in tiny.state_dict() if k.startswith("mapping.fc")] == [
        "mapping.fc0.weight", "mapping.fc0.bias", "mapping.fc1.weight", "mapping.fc1.bias"]
    same = make_tiny_generator(seed=0)
    other = make_tiny_generator(seed=1)
    for key, value in tiny.state_dict().items():
        assert torch.equal(value, same.state_dict()[key]), key
    assert not torch.equal(tiny.synthesis.b64.conv1.weight, other.synthesis.b64.conv1.weight)
    assert tiny.w_avg.abs().sum() > 0  # mean mapping output, so truncation does something
    z = torch.randn(2, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        img = tiny(z)
    assert img.shape == (2, 3, 64, 64) and torch.isfinite(img).all()
    assert not torch.allclose(img[0], img[1])


def test_truncation_and_cutoff(tiny):
    z = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        w1 = tiny.mapping(z)
        w0 = tiny.mapping(z, truncation_psi=0)
        wh = tiny.mapping(z, truncation_psi=0.5)
        wc = tiny.mapping(z, truncation_psi=0.5, truncation_cutoff=4)
    assert torch.allclose(w0, tiny.w_avg.expand_as(w0))
    assert torch.allclose(wh, tiny.w_avg + 0.5 * (w1 - tiny.w_avg), atol=1e-6)
    assert torch.allclose(wc[:, :4], wh[:, :4]) and torch.equal(wc[:, 4:], w1[:, 4:])
    assert all(torch.equal(w1[:, 0], w1[:, i]) for i in range(tiny.num_ws))


def test_noise_modes(pdir, io):
    G = load_generator(pdir / "state_dict.safetensors")  # P has nonzero noise strengths
    ws = io["ws_psi1"][:2]
    with torch.no_grad():
        const = G.synthesis(ws, noise_mode="const")
        torch.manual_seed(0)
        r1 = G.synthesis(ws, noise_mode="random")
        r2 = G.synthesis(ws, noise_mode="random")
        none = G.synthesis(ws, noise_mode="none")
    assert (const - r1).abs().max() > 1e-3 and (r1 - r2).abs().max() > 1e-3 and (const - none).abs().max() > 1e-3
    assert torch.equal(const, G.synthesis(ws, noise_mode="const"))
    with pytest.raises(ValueError, match="noise_mode"):
        G.synthesis(ws, noise_mode="bogus")


def test_shape_checks(tiny):
    with pytest.raises(ValueError, match="ws must have shape"):
        tiny.synthesis(torch.zeros(1, 9, 64))
    with pytest.raises(ValueError, match="z must have shape"):
        tiny.mapping(torch.zeros(1, 32))


def test_make_tiny_models_script(tmp_path):
    import subprocess

    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-m", "scripts.make_tiny_models", "--out", str(tmp_path)],
                         cwd=root, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    G = load_generator(tmp_path / "generator_tiny.safetensors")
    ref = make_tiny_generator(seed=0)
    for key, value in ref.state_dict().items():
        assert torch.equal(G.state_dict()[key], value), key
    assert (tmp_path / "cosegmentation_tiny.pth.tar").is_file()


def test_rosinality_training_snapshot_with_args(pdir, io, tmp_path):
    """rosinality train.py snapshots also hold 'g', 'd', optimizer states and an argparse Namespace."""
    import argparse

    ckpt = torch.load(pdir / "rosinality_ckpt.pt", weights_only=True)
    ckpt.update(g={k: v + 1 for k, v in ckpt["g_ema"].items()}, d={"w": torch.zeros(2)},
                g_optim={"state": {}, "param_groups": [{"lr": 0.002}]}, args=argparse.Namespace(size=32, n_mlp=2))
    path = tmp_path / "snapshot.pt"
    torch.save(ckpt, path)
    _check_parity(load_generator(path), io, cases=("psi0p7",))


@pytest.mark.parametrize("taps", [[1, 3, 3, 1], [1, 2, 1], [1, 2, 3], [1, 1]])
def test_resampling_fast_paths_match_reference(taps):
    from models.stylegan2.networks import conv2d_resample, setup_filter, upfirdn2d, upsample2d

    f = setup_filter(taps)
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    fw = f.shape[1]
    ref = upfirdn2d(x, f, up=2, padding=[(fw + 1) // 2, (fw - 2) // 2] * 2, gain=4)
    out = upsample2d(x, f)
    assert out.shape == ref.shape == (2, 3, 10, 10)
    assert torch.allclose(out, ref, atol=1e-6)
    # Upsampling conv: transposed conv + FIR equals zero insertion + FIR + plain (flipped) conv at full resolution.
    w = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(1))
    y = conv2d_resample(x, w, f=f, up=2, padding=1, flip_weight=False)
    up = upfirdn2d(x, f, up=2, padding=[(fw + 1) // 2 + 1, (fw - 2) // 2 + 1] * 2, gain=4)
    y_ref = torch.nn.functional.conv2d(up, w.flip([2, 3]))
    assert y.shape == y_ref.shape == (2, 4, 10, 10)
    assert torch.allclose(y, y_ref, atol=1e-5)


def test_conditional_generator_builds_and_runs():
    """c_dim > 0 adds the official label embedding (mapping.embed); not checked against official outputs."""
    G = Generator(z_dim=16, c_dim=3, w_dim=16, img_resolution=8, mapping_kwargs={"num_layers": 2},
                  channel_base=64, channel_max=16).eval()
    assert "mapping.embed.weight" in G.state_dict()
    with torch.no_grad():
        img = G(torch.randn(2, 16), torch.eye(3)[:2])
    assert img.shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="conditional"):
        G(torch.randn(2, 16))
