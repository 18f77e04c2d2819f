"""Shared helpers: atomic output, the one-line CLI error wrapper, pixel conversions."""
import subprocess
import sys

import pytest
import torch

from keepr.errors import KeeprError, MissingWeightsError
from keepr.fileio import atomic_dir, atomic_path, sha256_file, write_text_atomic


def test_atomic_path_renames_on_success(tmp_path):
    dest = tmp_path / "out" / "a.txt"
    with atomic_path(dest) as tmp:
        tmp.write_text("hello")
        assert not dest.exists()
    assert dest.read_text() == "hello"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["a.txt"]


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    dest = tmp_path / "a.txt"
    with pytest.raises(RuntimeError):
        with atomic_path(dest, suffix=".mp4") as tmp:
            assert tmp.name.endswith(".mp4.tmp")
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir(tmp_path):
    dest = tmp_path / "run"
    with pytest.raises(ValueError):
        with atomic_dir(dest) as tmp:
            (tmp / "x").write_text("1")
            raise ValueError
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(dest) as tmp:
        (tmp / "x").write_text("1")
    assert (dest / "x").read_text() == "1"


def test_sha256(tmp_path):
    p = tmp_path / "f"
    write_text_atomic(p, "abc")
    assert sha256_file(p) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_missing_weights_message_names_file_and_source():
    err = MissingWeightsError("weights/ffhq.pkl", "StyleGAN2 FFHQ generator", "the stylegan2-ada-pytorch release page")
    assert isinstance(err, KeeprError)
    assert "weights/ffhq.pkl" in str(err) and "stylegan2-ada-pytorch" in str(err)


def test_cli_main_prints_one_line_and_exits_1():
    code = (
        "from keepr.errors import KeeprError, cli_main\n"
        "@cli_main\n"
        "def main():\n"
        "    raise KeeprError('bad input:\\n  x.mp4 is not a video')\n"
        "main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: bad input: x.mp4 is not a video"
    assert "\n" not in proc.stderr.strip()


def test_atomic_outputs_get_umask_permissions(tmp_path):
    import os

    mask = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "f") as tmp:
            tmp.write_text("x")
        with atomic_dir(tmp_path / "d") as tmp:
            pass
    finally:
        os.umask(mask)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755


def test_read_state_dict_formats_and_refusals(tmp_path):
    import pickle

    import torch
    from safetensors.torch import save_file

    from keepr.weights import read_state_dict

    w = {"fc.weight": torch.arange(6.0).reshape(2, 3)}
    save_file(w, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": w}, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        assert torch.equal(read_state_dict(tmp_path / name, "test")["fc.weight"], w["fc.weight"])

    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "evil.pth").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(KeeprError, match="evil.pth"):
        read_state_dict(tmp_path / "evil.pth", "test")
    assert not marker.exists()
    (tmp_path / "list.pth").write_bytes(b"")
    with pytest.raises(KeeprError, match="list.pth"):
        read_state_dict(tmp_path / "list.pth", "test")


def test_pixel_conversions_round_trip():
    """uint8 -> [-1, 1] -> uint8 is the identity, and generator values map to the nearest level (NVlabs convention)."""
    from keepr.images import to_float_image, to_uint8

    levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16)
    x = to_float_image(levels)
    assert x.dtype == torch.float32 and x.min() == -1.0 and x.max() == 1.0
    assert torch.equal(to_uint8(x), levels)
    assert torch.equal(to_float_image(x), x)  # floats pass through
    y = torch.tensor([-2.0, -1.0, 0.0, 0.003, 1.0, 3.0])
    assert to_uint8(y).tolist() == [0, 0, 128, 128, 255, 255]
    assert to_uint8(torch.tensor([0.01])).item() == round((0.01 + 1) * 127.5)
