"""``python -m anonymizer.batch``: many inputs split across Lightning ranks, reruns, the merged summary (issue 17)."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from anonymizer.batch import Item, collect_inputs, deal, main, output_names

ROOT = Path(__file__).resolve().parents[1]
# Fast settings for the tiny models: one candidate draw fewer, no identity check of the output, one torch thread.
FAST = ["--coverage.identity", "false", "--virtual_face.num_candidates", "2", "--progress", "false", "--threads", "1"]
DDP2 = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
OUTPUT_FILES = ("anonymized.mp4", "candidates.png", "latent.npy", "virtual_face.png")


def test_output_names_mirror_the_tree_and_never_collide():
    assert output_names(["a.mp4", "sub/b.mov", "c"]) == ["a", "sub/b", "c"]
    # Same stem, or an output folder that would hold another input's: the extension is kept.
    assert output_names(["a.mp4", "a.mkv", "b.mp4", "b/x.mp4"]) == ["a_mp4", "a_mkv", "b_mp4", "b/x"]


def test_deal_gives_whole_inputs_largest_first_round_robin():
    items = [Item(k, f"{k}.mp4", f"{k}.mp4", str(k), "video", w) for k, w in enumerate([5, 50, 20, 20, 1])]
    assert deal(items, 1) == [[1, 2, 3, 0, 4]]
    assert deal(items, 2) == [[1, 3, 4], [2, 0]]
    assert deal(items, 3) == [[1, 0], [2, 4], [3]]
    assert sorted(sum(deal(items, 4), [])) == [0, 1, 2, 3, 4]


def test_list_file_inputs_and_errors(tmp_path, media_dir):
    videos = media_dir / "videos"
    lst = tmp_path / "list.txt"
    lst.write_text(f"# clips\n{videos / 'bbaf2n.mpg'}\n\n{videos / 'video_01.mp4'}\n")
    root, items = collect_inputs(lst)
    assert root == videos and [i.rel for i in items] == ["bbaf2n.mpg", "video_01.mp4"]
    assert [i.out for i in items] == ["bbaf2n", "video_01"] and all(i.work > 0 for i in items)
    lst.write_text("missing.mp4\n")
    with pytest.raises(Exception, match="line 1: missing.mp4: no such file"):
        collect_inputs(lst)


def test_errors_before_any_work_are_one_line(tmp_path, tiny_models, capsys):
    out = tmp_path / "out"
    cfg = str(tiny_models["config"])
    for argv, what in ((["--inputs", str(tmp_path / "nowhere"), "--config", cfg], "no such folder"),
                       (["--inputs", str(tmp_path), "--config", cfg], "no videos"),
                       (["--inputs", str(tmp_path), "--generator", str(tmp_path / "g.pkl")], "g.pkl")):
        with pytest.raises(SystemExit) as exc:
            main([*argv, "--out", str(out), "--progress", "false"])
        assert exc.value.code == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and what in err and len(err.splitlines()) == 1
    assert not out.exists()


# ------------------------------------------------------------------------------------------------------------------
# End to end on short clips: two that work (one in a sub-folder) and one whose face the tiny config cannot track.


@pytest.fixture(scope="module")
def clips(tmp_path_factory, media_dir):
    from tests.support.clips import first_frames

    d = tmp_path_factory.mktemp("batch_clips")
    (d / "sub").mkdir()
    videos = media_dir / "videos"
    first_frames(videos / "bbaf2n.mpg", d / "a.mp4", 8)
    first_frames(videos / "video_01.mp4", d / "sub" / "b.mp4", 6)
    first_frames(videos / "face-demographics-first12.mp4", d / "c.mp4", 4)  # no face at upsample 0: fails
    return d


def _argv(clips, out, config):
    return ["--inputs", str(clips), "--out", str(out), "--config", str(config), *FAST]


def _run_cli(argv, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "anonymizer.batch", *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600, **kw)


def _comparable(summary: dict) -> list[dict]:
    """The records without what depends on the run (timings, which rank did it)."""
    return [{k: v for k, v in r.items() if k not in ("seconds", "anonymize_seconds", "rank")}
            for r in summary["records"]]


def _outputs(out: Path) -> dict[str, bytes]:
    return {f"{d}/{name}": (out / d / name).read_bytes() for d in ("a", "sub/b") for name in OUTPUT_FILES}


def assert_same_outputs(out: Path, ref_out: Path) -> None:
    """Every output byte-identical, except that the H.264 stream of an anonymized.mp4 has been seen (rarely, under
    heavy load) to differ by one byte between runs: for those the decoded frames must agree within 1 grey level.
    TODO(issue 17): find the source of that one-byte difference and compare every file byte for byte."""
    from anonymizer.video import VideoReader

    a, b = _outputs(out), _outputs(ref_out)
    assert a.keys() == b.keys()
    for k in a:
        if a[k] == b[k]:
            continue
        assert k.endswith("anonymized.mp4"), k
        fa = [f.image.astype(int) for f in VideoReader(out / k)]
        fb = [f.image.astype(int) for f in VideoReader(ref_out / k)]
        assert len(fa) == len(fb) and all(abs(x - y).max() <= 1 for x, y in zip(fa, fb)), k


@pytest.fixture(scope="module")
def reference(clips, tiny_models, tmp_path_factory):
    """One process, in this process: (out, summary)."""
    out = tmp_path_factory.mktemp("batch_ref") / "out"
    with pytest.raises(SystemExit) as exc:  # one input fails: status 1, after the summary
        main(_argv(clips, out, tiny_models["config"]))
    assert exc.value.code == 1
    return out, json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_one_process_summary(reference, clips):
    out, s = reference
    assert (s["total"], s["done"], s["skipped"], s["failed"], s["world_size"]) == (3, 2, 0, 1, 1)
    rec = {r["output"]: r for r in s["records"]}
    assert [r["input"] for r in s["records"]] == [str(clips / "a.mp4"), str(clips / "c.mp4"), str(clips / "sub/b.mp4")]
    a = rec["a"]
    assert a["status"] == "done" and a["frames"] == 8 and a["persons_found"] == a["persons_chosen"] == 1
    assert a["faces_anonymized"] == a["faces_by_swap"] + a["faces_by_fallback"] >= 8 and a["faces_left"] == 0
    report = json.loads((out / "a" / "report.json").read_text())
    assert a["output_sha256"] == report["output"]["sha256"] and a["input_sha256"] == report["input"]["sha256"]
    c = rec["c"]
    assert c["status"] == "failed" and "no face could be tracked" in c["error"] and "\n" not in c["error"]
    assert not (out / "c").exists()
    assert s["ranks"][0]["inputs"] == 3 and s["ranks"][0]["busy_seconds"] > 0 and s["load_balance"] == 1.0
    with open(out / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["done", "failed", "done", ""] and rows[-1]["input"] == "(rank 0)"


@pytest.mark.slow
def test_two_processes_equal_one_then_a_rerun_skips(reference, clips, tiny_models, tmp_path):
    ref_out, ref = reference
    out = tmp_path / "out"
    r = _run_cli([*_argv(clips, out, tiny_models["config"]), *DDP2])
    assert r.returncode == 1, r.stderr[-3000:]
    assert "1 of 3 input(s) failed" in r.stderr and "c.mp4" in r.stderr
    s = json.loads((out / "summary.json").read_text())
    assert_same_outputs(out, ref_out)  # byte-identical outputs (see assert_same_outputs for the mp4)
    assert _comparable(s) == _comparable(ref)  # the same summary, timings and ranks aside
    assert s["world_size"] == 2 and [x["rank"] for x in s["ranks"]] == [0, 1]
    assert sorted(x["inputs"] for x in s["ranks"]) == [1, 2] and s["load_balance"] >= 1.0
    # Largest first, round-robin: b (640x480) on rank 0, a on rank 1, c on rank 0.
    assert {x["output"]: x["rank"] for x in s["records"]} == {"sub/b": 0, "a": 1, "c": 0}

    # A rerun (one process) skips what is done, tries the failed input again.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("anonymized.mp4")}
    with pytest.raises(SystemExit):
        main(_argv(clips, out, tiny_models["config"]))
    s2 = json.loads((out / "summary.json").read_text())
    assert [x["status"] for x in s2["records"]] == ["skipped", "failed", "skipped"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("anonymized.mp4")} == before
    assert [{k: v for k, v in x.items() if k != "status"} for x in _comparable(s2)] == \
        [{k: v for k, v in x.items() if k != "status"} for x in _comparable(ref)]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_outputs(reference, clips, tiny_models, tmp_path):
    ref_out, ref = reference
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "anonymizer.batch", *_argv(clips, out, tiny_models["config"]),
                             *DDP2], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        while not list(out.rglob("report.json")):
            assert proc.poll() is None, "the run ended before any output appeared"
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # rank 0, its rank-1 child: the whole group
        proc.wait()
    finished = sorted(p.parent.relative_to(out).as_posix() for p in out.rglob("report.json"))
    assert finished and not (out / "summary.json").exists()

    with pytest.raises(SystemExit) as exc:  # the rerun: one process
        main(_argv(clips, out, tiny_models["config"]))
    assert exc.value.code == 1  # c.mp4 still fails
    s = json.loads((out / "summary.json").read_text())
    status = {x["output"]: x["status"] for x in s["records"]}
    assert status == {o: ("skipped" if o in finished else "done" if o != "c" else "failed") for o in status}
    assert "done" in status.values()  # the kill came before the second output
    assert_same_outputs(out, ref_out)
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.endswith(".lock")]
