"""Shared helpers: atomic output, the one-line CLI error wrapper, pixel conversions."""
import subprocess
import sys
from pathlib import Path

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


def test_loaders_name_the_missing_file_and_where_to_get_it(tmp_path):
    """Each weight loader, given a file that is not there, raises MissingWeightsError (a KeeprError, a
    FileNotFoundError) in one line naming the file, what it is and its source in keepr.registry."""
    from keepr.registry import WEIGHTS
    from models.arcface import load_arcface
    from models.cosegmentation.loader import load_cosegmentation
    from models.encoder import load_encoder
    from models.stylegan2 import load_generator

    root = Path(__file__).resolve().parents[1]
    cases = [
        ("generator", "ffhq.pkl", lambda p: load_generator(p)),
        ("encoder", "encoder.safetensors", lambda p: load_encoder(p, None)),
        ("arcface", "model_ir_se50.pth", lambda p: load_arcface(p)),
        ("cosegmentation", "vox-10segments.pth.tar",
         lambda p: load_cosegmentation(p, root / "configs/cosegmentation/vox-256-10segments.yaml")),
    ]
    for key, name, load in cases:
        path = tmp_path / name
        with pytest.raises(MissingWeightsError) as err:
            load(path)
        msg = str(err.value)
        assert isinstance(err.value, KeeprError) and isinstance(err.value, FileNotFoundError)
        assert "\n" not in msg and msg.startswith(f"missing weights: {path} (") and not path.exists(), msg
        assert msg.endswith(f"; get it from: {WEIGHTS[key].where}"), (key, msg)


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
    torch.save(w, tmp_path / "plain.pth")  # a bare state dict
    torch.save({"state_dict": w, "epoch": 3}, tmp_path / "w.pth")  # a checkpoint wrapping it: unwrapped
    for name in ("w.safetensors", "plain.pth", "w.pth"):
        assert read_state_dict(tmp_path / name, "test").keys() == w.keys(), name
        assert torch.equal(read_state_dict(tmp_path / name, "test")["fc.weight"], w["fc.weight"]), name
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(KeeprError, match=r"cut.safetensors: cannot read the test weights: the safetensors file is "
                                         r"truncated or corrupt"):
        read_state_dict(tmp_path / "cut.safetensors", "test")

    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "evil.pth").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(KeeprError, match=r"evil.pth: cannot read the test weights: it holds pickled Python objects.*"
                                         r"can run code"):
        read_state_dict(tmp_path / "evil.pth", "test")
    assert not marker.exists()
    # A torch file holding tensors but no dict (here a list) is read, then refused: not a state dict.
    torch.save([w["fc.weight"]], tmp_path / "list.pth")
    with pytest.raises(KeeprError) as err:
        read_state_dict(tmp_path / "list.pth", "test")
    assert str(err.value) == f"{tmp_path / 'list.pth'}: the test file does not hold a state_dict (it holds a list)."
    # An empty file (an interrupted download) is truncated, said so.
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(KeeprError, match=r"empty.pth: cannot read the test weights: the file is truncated"):
        read_state_dict(tmp_path / "empty.pth", "test")


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


# ----------------------------------------------------------------------------------------------------------------
# Reliability of outputs (issue 12): stale temporaries, one writer per output, symlinks, mount points, disk full.


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _fake_temp(parent, dest_name, pid, start=0, host=None, suffix="", is_dir=True):
    from keepr.fileio import host_tag

    p = parent / f".{dest_name}.keepr-{host or host_tag()}-{pid}-{start}-0123abcd{suffix}.tmp"
    if is_dir:
        p.mkdir()
        (p / "anonymized.mp4").write_bytes(b"partial")
    else:
        p.write_bytes(b"partial")
    return p


def test_temporaries_carry_their_owner(tmp_path):
    import os

    from keepr.fileio import process_start_time, temporary_owner

    with atomic_dir(tmp_path / "out") as tmp:
        host, pid, start = temporary_owner(tmp, tmp_path / "out")
        assert pid == os.getpid() and start == process_start_time(os.getpid()) and start > 0
    with atomic_path(tmp_path / "a.mp4", suffix=".mp4") as tmp:
        assert tmp.name.startswith(".a.mp4.keepr-") and tmp.name.endswith(".mp4.tmp")
        assert temporary_owner(tmp, tmp_path / "a.mp4")[1] == os.getpid()


def test_stale_temporary_of_a_killed_run_is_removed_by_the_next_run(tmp_path):
    """A run SIGKILLed while writing leaves its hidden temporary; the next run into the same place removes it."""
    import signal

    dest = tmp_path / "out"
    code = ("import sys, time\n"
            "from keepr.fileio import atomic_dir\n"
            f"with atomic_dir({str(dest)!r}) as tmp:\n"
            "    (tmp / 'anonymized.mp4').write_bytes(b'partial')\n"
            "    print(tmp, flush=True)\n"
            "    time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        from pathlib import Path

        tmp = Path(proc.stdout.readline().strip())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    assert tmp.is_dir() and tmp.parent == tmp_path and not dest.exists()

    removed = []
    with atomic_dir(dest, on_stale=removed.extend) as new:
        (new / "x").write_text("1")
    assert removed == [tmp] and not tmp.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_remove_stale_temporaries_removes_only_dead_owners_on_this_host(tmp_path):
    import os

    from keepr.fileio import process_start_time, remove_stale_temporaries

    dest = tmp_path / "out"
    dead = _fake_temp(tmp_path, "out", _dead_pid())
    dead_file = _fake_temp(tmp_path, "out", _dead_pid(), suffix=".mp4", is_dir=False)
    me = os.getpid()
    live = _fake_temp(tmp_path, "out", me, process_start_time(me))
    reused = _fake_temp(tmp_path, "out", me, process_start_time(me) + 12345)  # pid reused by a later process
    keep = [
        live,
        _fake_temp(tmp_path, "out", _dead_pid(), host="ffffffff" if _host() != "ffffffff" else "00000000"),
        _fake_temp(tmp_path, "other", _dead_pid()),  # another output's temporary
        _fake_temp(tmp_path, "out2", _dead_pid()),
    ]
    foreign = [tmp_path / ".out.abc123.tmp", tmp_path / ".out.keepr-notours.tmp", tmp_path / "out.keepr-1-2-3-4.tmp",
               tmp_path / f".out.keepr-{_host()}-{_dead_pid()}-0-0123abcd.tmp.bak"]
    for f in foreign:
        f.write_text("not ours")
    link = tmp_path / f".out.keepr-{_host()}-{_dead_pid()}-0-0123abcd.tmp"
    link.symlink_to(tmp_path / "elsewhere")
    removed = remove_stale_temporaries(dest)
    assert sorted(removed) == sorted([dead, dead_file, reused])
    for p in keep + foreign + [link]:
        assert os.path.lexists(p), p
    assert remove_stale_temporaries(dest) == []


def _host():
    from keepr.fileio import host_tag

    return host_tag()


def test_process_alive():
    import os

    from keepr.fileio import process_alive, process_start_time

    me = os.getpid()
    assert process_alive(me) and process_alive(me, process_start_time(me))
    assert not process_alive(me, process_start_time(me) + 1)
    assert not process_alive(_dead_pid()) and not process_alive(0) and not process_alive(2 ** 40)


def test_output_lock_refuses_a_second_writer(tmp_path):
    import os

    from keepr.fileio import output_lock

    dest = tmp_path / "out"
    with output_lock(dest) as target:
        assert target == dest.resolve()
        lock = tmp_path / ".out.lock"
        assert lock.read_text().strip() == str(os.getpid())
        with pytest.raises(KeeprError, match=rf"another KEEP:R run is writing to it \(pid {os.getpid()}\)"):
            with output_lock(dest):
                pass
        # Another process is refused too, and through a symlink to the same output.
        link = tmp_path / "link"
        link.symlink_to(dest)
        code = ("from keepr.errors import cli_main\nfrom keepr.fileio import output_lock\n"
                f"cli_main(lambda: output_lock({str(link)!r}).__enter__())()\n")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert r.returncode == 1 and f"another KEEP:R run is writing to it (pid {os.getpid()})" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert not lock.exists()  # removed on exit
    with output_lock(dest):  # free again
        pass


def test_output_lock_left_by_a_killed_process_does_not_block(tmp_path):
    import signal

    from keepr.fileio import output_lock

    dest = tmp_path / "out"
    code = ("import time\nfrom keepr.fileio import output_lock\n"
            f"with output_lock({str(dest)!r}):\n    print('locked', flush=True)\n    time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(KeeprError, match=f"pid {proc.pid}"):
            with output_lock(dest):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    assert (tmp_path / ".out.lock").exists()  # left behind by the killed process...
    with output_lock(dest):  # ...but not locked any more
        pass
    assert not (tmp_path / ".out.lock").exists()


def test_atomic_dir_through_a_symlink_to_an_empty_directory(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    with atomic_dir(link) as tmp:
        assert tmp.parent == tmp_path
        (tmp / "report.json").write_text("{}")
    assert link.is_symlink() and link.resolve() == real  # the symlink is left as it was
    assert (real / "report.json").read_text() == "{}"
    # A symlink to a directory that is not empty is refused before any work.
    with pytest.raises(KeeprError, match="link: output directory exists and is not empty"):
        with atomic_dir(link):
            raise AssertionError("the block must not run")
    # A symlink to a file is refused too.
    (tmp_path / "f").write_text("x")
    (tmp_path / "flink").symlink_to(tmp_path / "f")
    with pytest.raises(KeeprError, match="flink: output exists and is not a directory"):
        with atomic_dir(tmp_path / "flink"):
            pass


def test_atomic_dir_writes_into_a_mount_point(tmp_path, monkeypatch):
    """An empty mount point cannot be replaced by a rename: the files are written into it."""
    import os

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                             capture_output=True).returncode == 0
    try:
        if not mounted:  # no privilege to mount here: pretend it is one (rename over it would then succeed)
            real_ismount = os.path.ismount
            monkeypatch.setattr(os.path, "ismount", lambda p: os.fspath(p) == str(mnt) or real_ismount(p))
        assert os.path.ismount(mnt)
        with atomic_dir(mnt) as tmp:
            assert tmp.parent == mnt
            (tmp / "anonymized.mp4").write_bytes(b"video")
            (tmp / "sub").mkdir()
            (tmp / "sub" / "f").write_text("1")
        assert sorted(p.name for p in mnt.iterdir()) == ["anonymized.mp4", "sub"]
        assert (mnt / "sub" / "f").read_text() == "1"
        assert os.path.ismount(mnt)
        # A failure leaves the mount point empty.
        for p in ("anonymized.mp4", "sub/f", "sub"):
            q = mnt / p
            q.rmdir() if q.is_dir() else q.unlink()
        with pytest.raises(RuntimeError):
            with atomic_dir(mnt) as tmp:
                (tmp / "x").write_text("1")
                raise RuntimeError("boom")
        assert list(mnt.iterdir()) == []
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)], check=True)


def test_disk_full_is_one_line_error_and_removes_the_temporary(tmp_path, monkeypatch):
    import errno
    import pathlib

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_bytes", full)
    with pytest.raises(KeeprError) as exc:
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "anonymized.mp4").write_bytes(b"x" * 100)
    msg = str(exc.value)
    assert "out: cannot write the output (No space left on device" in msg and "MB free on" in msg
    assert "\n" not in msg
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(KeeprError, match="a.bin: cannot write the output"):
        with atomic_path(tmp_path / "a.bin") as tmp:
            tmp.write_bytes(b"x")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_errors_about_other_files_are_not_blamed_on_the_output(tmp_path):
    with pytest.raises(FileNotFoundError):
        with atomic_dir(tmp_path / "out"):
            open(tmp_path / "input-that-is-missing.mp4", "rb")
    with pytest.raises(KeeprError, match="out: cannot write the output .*Permission denied"):
        with atomic_dir(tmp_path / "out") as tmp:
            raise PermissionError(13, "Permission denied", str(tmp / "report.json"))
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_refuses_an_output_written_meanwhile(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(KeeprError, match="not empty"):
        with atomic_dir(dest) as tmp:
            (tmp / "x").write_text("mine")
            (dest / "y").write_text("theirs")
    assert [p.name for p in dest.iterdir()] == ["y"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_real_disk_full_on_a_small_tmpfs(tmp_path):
    """The same on a real full file system (a 64 KiB tmpfs; skipped where mounting is not allowed)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        with pytest.raises(KeeprError,
                           match=r"small/out: cannot write the output \(No space left on device, .* MB free"):
            with atomic_dir(mnt / "out") as tmp:
                with open(tmp / "anonymized.mp4", "wb") as f:
                    for _ in range(64):
                        f.write(b"\0" * 4096)
                        f.flush()
        assert list(mnt.iterdir()) == []  # the partial output is gone
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_weight_registry_is_the_readme_table_and_the_messages():
    from pathlib import Path

    from keepr.registry import WEIGHTS, missing, table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert table() in readme
    for key, w in WEIGHTS.items():
        msg = str(missing(key, f"weights/{key}.bin"))
        assert msg == f"missing weights: weights/{key}.bin ({w.what}) not found; get it from: {w.where}"
