"""generate_pairs.py and datasets/pairs.py: determinism per index, resume, refusal, DDP, reading."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import generate_pairs
import training.pairs_module as pairs_module
from datasets.pairs import (
    MANIFEST,
    PairDataModule,
    PairDataset,
    find_generator,
    fingerprint,
    load_manifest,
    pair_z,
    pairs_z,
)
from keepr.errors import KeeprError, MissingWeightsError
from keepr.fileio import sha256_file
from models.stylegan2 import load_generator, make_tiny_generator
from training.pairs_module import PairRenderer

ROOT = Path(__file__).resolve().parents[1]
N, SHARD, RB = 24, 8, 4  # 3 shards of 2 generator micro-batches


@pytest.fixture(scope="module")
def gen_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gen") / "generator_tiny.safetensors"
    make_tiny_generator(0).save(path)
    return path


def run(gen: Path, out: Path, *extra: str) -> None:
    """The command line, in-process."""
    argv = ["--config", str(ROOT / "configs/pairs/tiny.yaml"), "--generator", str(gen), "--out_dir", str(out),
            "--num_pairs", str(N), "--shard_size", str(SHARD), "--render_batch", str(RB),
            "--trainer.enable_progress_bar", "false", *extra]
    assert generate_pairs.main(argv) == 0


def shard_hashes(root: Path) -> list[str]:
    return [s["sha256"] for s in load_manifest(root)["shards"]]


def contents(root: Path) -> dict[str, torch.Tensor]:
    ds = PairDataset(root)
    items = [ds[i] for i in range(len(ds))]
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


@pytest.fixture(scope="module")
def reference(gen_path, tmp_path_factory) -> Path:
    """One dataset made with the config's batch size, on one process."""
    out = tmp_path_factory.mktemp("ref") / "pairs"
    run(gen_path, out)
    return out


# ----------------------------------------------------------------------------------------------------------------------

def test_pair_z_depends_only_on_seed_and_index():
    a = pair_z(3, 7, 64)
    assert a.dtype == torch.float32 and a.shape == (64,)
    assert torch.equal(a, pair_z(3, 7, 64))
    assert not torch.equal(a, pair_z(3, 8, 64)) and not torch.equal(a, pair_z(4, 7, 64))
    assert torch.equal(pairs_z(3, [9, 7], 64)[1], a)
    assert 0.5 < a.std() < 1.5


def test_render_is_independent_of_batching(gen_path):
    G = load_generator(gen_path)
    r = PairRenderer(G, truncation_psi=0.7, render_batch=8)
    idx = torch.arange(3, 14)
    z = pairs_z(5, idx.tolist(), G.z_dim)
    with torch.inference_mode():
        whole = r.render(idx, z)
        for step in (3, 5):
            parts = [r.render(idx[s:s + step], z[s:s + step]) for s in range(0, len(idx), step)]
            for key in whole:
                assert torch.equal(whole[key], torch.cat([p[key] for p in parts])), (key, step)
        # The stored w is the mapping output (all num_ws rows equal without cutoff), the image its synthesis.
        ws = G.mapping(z, None, truncation_psi=0.7)
        assert torch.allclose(whole["w"], ws[:, 0], atol=1e-5)
        ref = (G.synthesis(ws, noise_mode="const") * 127.5 + 128).clamp(0, 255)
        assert (whole["image"].float() - ref).abs().max() <= 1.0


def test_dataset_layout_and_items(reference, gen_path):
    m = load_manifest(reference)
    assert m["complete"] and m["num_pairs"] == N and m["seed"] == 0 and m["latent"] == "w"
    assert m["generator"]["sha256"] == sha256_file(gen_path)
    # The generator's path is recorded relative to the pair set (and absolute, for a set moved alone).
    assert not Path(m["generator"]["path"]).is_absolute()
    assert (reference / m["generator"]["path"]).resolve() == gen_path.resolve()
    assert m["generator"]["absolute_path"] == str(gen_path.resolve())
    assert m["generator"]["config"]["img_resolution"] == 64 and m["resolution"] == 64
    assert [(s["start"], s["stop"]) for s in m["shards"]] == [(0, 8), (8, 16), (16, 24)]
    assert sorted(p.name for p in reference.iterdir()) == [MANIFEST] + [s["file"] for s in m["shards"]]
    ds = PairDataset(reference, verify=True)
    assert len(ds) == N
    item = ds[13]
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 64, 64)
    assert item["z"].dtype == torch.float32 and item["z"].shape == (64,)
    assert item["w"].dtype == torch.float32 and item["w"].shape == (64,)
    assert item["index"].dtype == torch.int64 and int(item["index"]) == 13
    assert torch.equal(item["z"], pair_z(0, 13, 64))
    assert torch.equal(ds[-1]["index"], torch.tensor(N - 1))
    with pytest.raises(IndexError):
        ds[N]
    c = contents(reference)
    assert torch.equal(c["index"], torch.arange(N))
    assert c["image"].float().std() > 5  # real images, not a constant
    # Same pairs as rendering the generator directly.
    G = load_generator(gen_path)
    with torch.inference_mode():
        direct = PairRenderer(G, render_batch=m["render_batch"]).render(c["index"], c["z"])
    assert torch.equal(direct["image"], c["image"]) and torch.equal(direct["w"], c["w"])


def test_same_dataset_for_any_batch_size(reference, gen_path, tmp_path):
    out = tmp_path / "pairs_b5"
    run(gen_path, out, "--batch_size", "5")
    assert shard_hashes(out) == shard_hashes(reference)
    for key, v in contents(out).items():
        assert torch.equal(v, contents(reference)[key])


def test_resume_after_interruption(reference, gen_path, tmp_path, monkeypatch):
    out = tmp_path / "pairs"
    real_write = pairs_module.write_shard
    calls = []

    def write_then_die(*args, **kwargs):
        if calls:
            raise RuntimeError("simulated kill")
        calls.append(1)
        real_write(*args, **kwargs)

    monkeypatch.setattr(pairs_module, "write_shard", write_then_die)
    with pytest.raises(RuntimeError, match="simulated kill"):
        run(gen_path, out, "--batch_size", "4")
    monkeypatch.setattr(pairs_module, "write_shard", real_write)
    assert (out / "shard_00000.safetensors").is_file() and not (out / "shard_00001.safetensors").exists()
    with pytest.raises(KeeprError, match="incomplete"):
        PairDataset(out)
    # A half-written temporary file left by a kill is never taken for a shard, and is cleaned up.
    stray = out / ".shard_00001.safetensors.x1y2.safetensors.tmp"
    stray.write_bytes(b"half a shard")
    first = (out / "shard_00000.safetensors").stat().st_mtime_ns
    run(gen_path, out, "--batch_size", "7")
    assert (out / "shard_00000.safetensors").stat().st_mtime_ns == first  # kept, not redone
    assert not stray.exists()
    assert shard_hashes(out) == shard_hashes(reference)

    # A missing shard in a finished dataset is regenerated identically; a corrupt one too.
    (out / "shard_00002.safetensors").unlink()
    (out / "shard_00001.safetensors").write_bytes(b"garbage")
    run(gen_path, out)
    assert shard_hashes(out) == shard_hashes(reference)
    PairDataset(out, verify=True)
    # Nothing left to do: the run only re-checks and the dataset stays complete.
    run(gen_path, out)
    assert load_manifest(out)["complete"] and shard_hashes(out) == shard_hashes(reference)


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every file of a directory: its sha256 and mtime."""
    return {p.name: (sha256_file(p), p.stat().st_mtime_ns) for p in sorted(root.iterdir())}


def test_extend_equals_a_set_made_at_the_larger_size(reference, gen_path, tmp_path):
    """--extend keeps the existing shards and gives, byte for byte, the set made at the larger size from scratch."""
    out = tmp_path / "pairs"
    run(gen_path, out, "--num_pairs", "12")  # shards [0, 8) and a partial [8, 12)
    first = snapshot(out)["shard_00000.safetensors"]
    run(gen_path, out, "--extend")  # to N = 24: [8, 12) grows to [8, 16), [16, 24) is new
    assert snapshot(out)["shard_00000.safetensors"] == first  # kept, not rewritten
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
    for s in load_manifest(reference)["shards"]:
        assert (out / s["file"]).read_bytes() == (reference / s["file"]).read_bytes(), s["file"]
    strip = lambda m: {**m, "shards": [{k: v for k, v in s.items() if k not in ("size", "mtime_ns")}
                                       for s in m["shards"]]}
    assert strip(load_manifest(out)) == strip(load_manifest(reference))
    assert torch.equal(PairDataset(out, verify=True)[N - 1]["z"], pair_z(0, N - 1, 64))


def test_other_num_pairs_is_refused_unless_overwrite(reference, gen_path, tmp_path, capsys):
    """A complete set is never shrunk (or grown without --extend): its files stay as they are, the exit status is 1."""
    out = tmp_path / "pairs"
    shutil.copytree(reference, out)
    before = snapshot(out)
    for extra, words in ((["--num_pairs", "8"], ("holds 24 pairs", "--overwrite")),
                         (["--num_pairs", "8", "--extend"], ("never shrunk", "--overwrite")),
                         (["--num_pairs", "28"], ("--extend", "--overwrite")),
                         (["--num_pairs", "28", "--extend", "--overwrite"], ("exclude each other",))):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            run(gen_path, out, *extra)
        assert exc.value.code == 1, extra
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and all(w in err for w in words), err
        assert snapshot(out) == before, extra
    run(gen_path, out, "--num_pairs", "8", "--overwrite")
    m = load_manifest(out)
    assert m["num_pairs"] == 8 and [s["file"] for s in m["shards"]] == ["shard_00000.safetensors"]
    assert shard_hashes(out) == shard_hashes(reference)[:1]


def flip_bytes(path: Path, keep_mtime: bool = False) -> None:
    """Change 8 bytes in the middle of a file (same size), optionally restoring its mtime."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 8] = bytes(b ^ 0xFF for b in data[mid:mid + 8])
    path.write_bytes(bytes(data))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_changed_shard_is_noticed(reference, gen_path, tmp_path, capsys):
    """A shard whose bytes changed (same size) is refused by training and rendered again by a rerun."""
    out = tmp_path / "pairs"
    shutil.copytree(reference, out)
    before = snapshot(out)
    run(gen_path, out)  # complete and intact: nothing is rewritten, the manifest included
    assert snapshot(out) == before
    shard = out / "shard_00001.safetensors"
    flip_bytes(shard)
    PairDataset(out)  # the layout alone looks fine ...
    with pytest.raises(KeeprError, match="shard_00001.safetensors: sha256 differs"):
        PairDataset(out, verify=True)
    with pytest.raises(KeeprError, match="sha256 differs"):
        PairDataModule(str(out))  # ... training checks the hashes before it starts
    capsys.readouterr()
    run(gen_path, out)
    assert "shard_00001.safetensors: sha256 differs" in capsys.readouterr().err
    assert shard.read_bytes() == (reference / shard.name).read_bytes()
    assert shard_hashes(out) == shard_hashes(reference) and load_manifest(out)["complete"]
    # Same size and mtime: only --verify reads every byte (the fast path trusts size + mtime).
    flip_bytes(shard, keep_mtime=True)
    run(gen_path, out)
    assert shard.read_bytes() != (reference / shard.name).read_bytes()
    run(gen_path, out, "--verify")
    assert shard.read_bytes() == (reference / shard.name).read_bytes()
    PairDataset(out, verify=True)


def test_refuses_other_seed_or_generator_unless_overwrite(reference, gen_path, tmp_path, capsys):
    out = tmp_path / "pairs"
    shutil.copytree(reference, out)
    before = {p.name: sha256_file(p) for p in out.iterdir()}
    other_gen = tmp_path / "other.safetensors"
    make_tiny_generator(1).save(other_gen)
    for extra, word in ((["--seed", "1"], "seed"), (["--generator", str(other_gen)], "generator_sha256"),
                        (["--truncation_psi", "0.5"], "truncation_psi")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            run(gen_path, out, *extra)
        assert exc.value.code == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and word in err and "--overwrite" in err
        assert {p.name: sha256_file(p) for p in out.iterdir()} == before
    run(gen_path, out, "--seed", "1", "--overwrite")
    m = load_manifest(out)
    assert m["seed"] == 1 and m["complete"]
    assert shard_hashes(out) != shard_hashes(reference)
    assert not torch.equal(contents(out)["z"], contents(reference)["z"])


def test_cli_bad_input(gen_path, tmp_path, capsys):
    out = tmp_path / "never"
    cases = [
        ["--generator", str(tmp_path / "missing.pkl")],            # missing generator
        ["--generator", str(ROOT / "configs/pairs/tiny.yaml")],    # not a generator file
        ["--generator", str(gen_path), "--num_pairs", "0"],
        ["--generator", str(gen_path), "--seed", "-1"],
        ["--generator", str(gen_path), "--noise_mode", "random"],
    ]
    for args in cases:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            generate_pairs.main(["--config", str(ROOT / "configs/pairs/tiny.yaml"), "--out_dir", str(out), *args])
        assert exc.value.code == 1, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, err
        assert not out.exists(), args
    # A non-empty directory that is not a pair dataset is refused, even with --overwrite.
    other = tmp_path / "photos"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit):
        run(gen_path, other, "--overwrite")
    assert sorted(p.name for p in other.iterdir()) == ["keep.txt"]


def test_datamodule_split_and_loaders(reference, gen_path):
    dm = PairDataModule(str(reference), batch_size=4, val_fraction=0.25)
    assert dm.manifest["num_pairs"] == N and dm.resolution == 64
    assert Path(dm.generator_path).resolve() == gen_path.resolve()
    assert dm.val_indices == list(range(18, 24)) and dm.train_indices == list(range(18))
    dm.setup("fit")
    val = list(dm.val_dataloader())
    assert torch.equal(torch.cat([b["index"] for b in val]), torch.arange(18, 24))
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "z", "w", "index"}
    assert batch["image"].shape == (4, 3, 64, 64) and batch["image"].dtype == torch.uint8
    assert batch["w"].shape == (4, 64) and batch["z"].shape == (4, 64)
    seen = torch.cat([b["index"] for b in dm.train_dataloader()])
    assert len(seen) == 16 and len(set(seen.tolist())) == 16 and max(seen.tolist()) < 18  # drop_last: 18 -> 16
    assert PairDataModule(str(reference), val_fraction=0.05).val_indices == [23]  # at least one
    with pytest.raises(KeeprError, match="not a pair dataset"):
        PairDataModule(str(reference.parent / "nowhere"))


def test_pair_set_copied_with_its_generator_finds_the_copy(reference, gen_path, tmp_path):
    """The manifest's relative path: a pair set copied together with its generator (same relative layout) uses the
    copy, not the original the absolute path names."""
    rel = load_manifest(reference)["generator"]["path"]
    pairs = tmp_path / "copy" / reference.parent.name / reference.name
    shutil.copytree(reference, pairs)
    gen_copy = Path(os.path.normpath(pairs / rel))
    assert gen_copy.resolve() != gen_path.resolve() and str(tmp_path) in str(gen_copy)
    gen_copy.parent.mkdir(parents=True)
    shutil.copy2(gen_path, gen_copy)
    assert find_generator(pairs) == gen_copy
    assert Path(PairDataset(pairs, verify=True).generator_path) == gen_copy
    # Moved alone (nothing at the relative path): the absolute path still finds the original.
    alone = tmp_path / "alone" / "pairs"
    shutil.copytree(reference, alone)
    assert not (alone / rel).exists() and find_generator(alone) == gen_path.resolve()


def test_moved_generator_is_found_by_the_given_path_and_checked(gen_path, tmp_path):
    """A generator that moved is found by the path the user gives, checked against the recorded sha256; another file
    (given, or lying at the recorded place) is refused in one line naming both hashes."""
    home = tmp_path / "weights" / "g.safetensors"
    home.parent.mkdir()
    shutil.copy2(gen_path, home)
    out = tmp_path / "pairs"
    run(home, out, "--num_pairs", str(SHARD))
    recorded = load_manifest(out)["generator"]["sha256"]
    moved = tmp_path / "elsewhere" / "renamed.safetensors"
    moved.parent.mkdir()
    home.rename(moved)
    with pytest.raises(MissingWeightsError) as err:
        find_generator(out)
    assert "g.safetensors" in str(err.value) and "--model.generator_path" in str(err.value)
    assert find_generator(out, moved) == moved
    other = tmp_path / "other.safetensors"
    make_tiny_generator(1).save(other)
    for given in (other, None):
        if given is None:
            shutil.copy2(other, home)  # another file at the recorded place
        with pytest.raises(KeeprError) as err:
            find_generator(out, given)
        msg = str(err.value)
        assert "\n" not in msg and recorded in msg and sha256_file(other) in msg and "made the pairs" in msg, msg
    with pytest.raises(MissingWeightsError, match="nowhere.pkl"):
        find_generator(out, tmp_path / "nowhere.pkl")


def test_old_manifest_with_an_absolute_path_still_loads(reference, gen_path, tmp_path):
    """Manifests written before the relative path (``path`` absolute, no ``absolute_path``) load, find their
    generator and are resumed like any other (the generator's path is not part of the set's identity)."""
    out = tmp_path / "pairs"
    shutil.copytree(reference, out)
    m = json.loads((out / MANIFEST).read_text())
    m["generator"] = {"path": str(gen_path.resolve()), "sha256": m["generator"]["sha256"],
                      "config": m["generator"]["config"]}
    (out / MANIFEST).write_text(json.dumps(m, indent=2) + "\n")
    assert fingerprint(m) == fingerprint(load_manifest(reference))
    assert find_generator(out) == gen_path.resolve()
    assert Path(PairDataModule(str(out)).generator_path) == gen_path.resolve()
    shards = {p.name: sha256_file(p) for p in out.glob("shard_*")}
    run(gen_path, out)  # accepted as the same set: nothing rendered again
    assert {p.name: sha256_file(p) for p in out.glob("shard_*")} == shards
    upgraded = load_manifest(out)  # only the generator's record changed: now relative to the set
    assert upgraded["complete"] and not Path(upgraded["generator"]["path"]).is_absolute()
    assert find_generator(out) == gen_path.resolve()


@pytest.mark.slow
def test_ddp_two_processes_write_the_same_dataset(reference, gen_path, tmp_path):
    out = tmp_path / "pairs_ddp"
    cmd = [sys.executable, "generate_pairs.py", "--config", "configs/pairs/tiny.yaml", "--generator", str(gen_path),
           "--out_dir", str(out), "--num_pairs", str(N), "--shard_size", str(SHARD), "--render_batch", str(RB),
           "--batch_size", "3",
           "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert shard_hashes(out) == shard_hashes(reference)
    # Resume with one shard missing: rank 1 has nothing to render and must not block rank 0.
    (out / "shard_00001.safetensors").unlink()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert shard_hashes(out) == shard_hashes(reference)
    ref = json.loads((reference / MANIFEST).read_text())
    got = json.loads((out / MANIFEST).read_text())
    for m in (ref, got):  # when a shard was written differs between the two sets
        for s in m["shards"]:
            del s["mtime_ns"]
    assert {k: v for k, v in got.items() if k != "generator"} == {k: v for k, v in ref.items() if k != "generator"}
