"""The web app's JSON API (FastAPI's test client) on the tiny models: uploads accepted and refused, no face, unknown
jobs, cancelling, expiry, a restart with unfinished jobs, two uploads queued on one worker."""
from __future__ import annotations

import json
import shutil
import threading
import time
import uuid
from pathlib import Path

import av
import numpy as np
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

FAST = ["--coverage.upsample", "0", "--coverage.identity", "false"]


@pytest.fixture(scope="module")
def settings(tiny_models):
    from webapp.config import infer_settings

    return infer_settings([str(tiny_models["config"])], FAST)


@pytest.fixture(scope="module")
def models(settings):
    from anonymizer.pipeline import load_models

    return load_models(settings.models, "cpu")


@pytest.fixture()
def make_client(settings, models, tmp_path):
    """make_client(**AppConfig fields) -> a started TestClient (closed at the end of the test)."""
    from webapp.app import create_app
    from webapp.config import AppConfig

    clients = []

    def make(**kw):
        kw.setdefault("work_dir", tmp_path / "jobs")
        client = TestClient(create_app(AppConfig(settings=kw.pop("settings", settings), **kw), models=models))
        client.__enter__()
        clients.append(client)
        return client

    def close(client):
        clients.remove(client)
        client.__exit__(None, None, None)

    make.close = close
    yield make
    for c in clients:
        c.__exit__(None, None, None)


def write_clip(path: Path, frames, fps: int = 25) -> Path:
    frames = list(frames)
    h, w = frames[0].shape[:2]
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for img in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return path


@pytest.fixture(scope="module")
def grid_frames(media_dir):
    from anonymizer.video import VideoReader

    return [f.image for f in VideoReader(media_dir / "videos" / "bbaf2n.mpg")]


@pytest.fixture(scope="module")
def short_clip(grid_frames, tmp_path_factory):
    """The first 12 frames of the GRID clip as an H.264 mp4 (plays in a browser as it is)."""
    return write_clip(tmp_path_factory.mktemp("clips") / "short.mp4", grid_frames[:12])


def upload(client, path: Path, name: str | None = None):
    with open(path, "rb") as f:
        return client.post("/api/jobs", files={"video": (name or path.name, f, "application/octet-stream")})


def wait_for(client, job_id: str, states, timeout: float = 120.0, busy_ok: bool = False) -> dict:
    deadline = time.time() + timeout
    while True:
        r = client.get(f"/api/jobs/{job_id}")
        assert r.status_code == 200, r.text
        j = r.json()
        if j["state"] in states and (busy_ok or not j["busy"]):
            return j
        assert j["state"] not in ("failed", "cancelled") or j["state"] in states, j["error"]
        assert time.time() < deadline, f"job stuck in {j['state']} ({j['progress']})"
        time.sleep(0.1)


def job_dirs(work_dir: Path) -> list[str]:
    return sorted(p.name for p in work_dir.iterdir()) if work_dir.exists() else []


# ----------------------------------------------------------------------------------------------------------------


def test_upload_choose_render(make_client, short_clip, tmp_path):
    c = make_client()
    assert c.get("/api/info").json()["num_segments"] == 10
    r = upload(c, short_clip, name="../../etc/passwd")
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    assert uuid.UUID(job_id).version == 4
    d = tmp_path / "jobs" / job_id
    assert sorted(p.name for p in d.iterdir()) == ["input", "job.json"]  # the client's name is no path
    first = c.get(f"/api/jobs/{job_id}").json()
    assert first["state"] in ("queued", "tracking", "choosing") and first["name"] == "passwd"
    assert first["original"]["url"] == f"/api/jobs/{job_id}/original"  # H.264 mp4: played as it is, no preview

    j = wait_for(c, job_id, ["choosing"])
    (p,) = j["persons"]
    assert (p["first_frame"], p["last_frame"], p["start_s"]) == (0, 11, 0.0) and p["end_s"] == pytest.approx(0.44)
    assert len(p["candidates"]) == 9 and all(k["status"] in ("ok", "no face", "rejected") for k in p["candidates"])
    assert all((k["distance"] is None) == (k["status"] == "no face") for k in p["candidates"])
    assert 0 <= p["chosen"] < 9 and [s["index"] for s in p["segments"]] == list(range(1, 11))
    for kind in ("thumbnail", "grid", "overlay"):
        r = c.get(f"/api/jobs/{job_id}/persons/0/{kind}.png")
        assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content[:4] == b"\x89PNG"
    assert c.get(f"/api/jobs/{job_id}/original").status_code == 200

    # 9 new candidates with seed 5 (picking one is the browser test's).
    r = c.post(f"/api/jobs/{job_id}/persons/0/seed", json={"seed": 5})
    assert r.status_code == 202 and r.json()["busy"] == "new candidates for person 0"
    assert c.post(f"/api/jobs/{job_id}/persons/0/seed", json={}).status_code == 409  # one at a time
    p = wait_for(c, job_id, ["choosing"])["persons"][0]
    assert p["seed"] == 5 and len(p["candidates"]) == 9
    chosen = p["chosen"]
    # Bad choices: messages, no change.
    for body, code, what in (({"persons": [], "parts": [1]}, 400, "person"), ({"persons": [0], "parts": []}, 400,
                             "part"), ({"persons": [0], "parts": [11]}, 400, "out of range"),
                             ({"persons": [4], "parts": [1]}, 400, "no person 4")):
        r = c.post(f"/api/jobs/{job_id}/render", json=body)
        assert r.status_code == code and what in r.json()["error"], r.text
    assert c.post(f"/api/jobs/{job_id}/persons/0/candidate", json={"candidate": 9}).status_code == 400
    assert c.post(f"/api/jobs/{job_id}/persons/7/candidate", json={"candidate": 1}).status_code == 404

    r = c.post(f"/api/jobs/{job_id}/render", json={"persons": [0], "parts": [1, 5]})
    assert r.status_code == 202 and r.json()["state"] == "rendering"
    assert c.post(f"/api/jobs/{job_id}/render", json={"persons": [0], "parts": [1]}).status_code == 409
    j = wait_for(c, job_id, ["done"])
    assert j["result"]["complete"] and j["result"]["frames"] == 12 and j["progress"]["done"] == 12
    r = c.get(j["result"]["video_download"])
    assert r.status_code == 200 and "attachment" in r.headers["content-disposition"]
    out = tmp_path / "anonymized.mp4"
    out.write_bytes(r.content)
    from anonymizer.video import count_frames, probe_video

    assert count_frames(out) == 12 and probe_video(out).width == 360
    rep = c.get(j["result"]["report"]).json()
    vf = rep["persons"]["anonymized"][0]["virtual_face"]
    assert rep["settings"]["swap"]["parts"] == [1, 5] and vf["chosen"] == chosen and vf["seed"] == 5
    assert sorted(p.name for p in (d / "result").iterdir()) == ["anonymized.mp4", "candidates.png", "latent.npy",
                                                                "report.json", "virtual_face.png"]
    assert not [p.name for p in d.iterdir() if p.name.startswith(".") and p.name != ".result.lock"]
    assert json.loads((d / "job.json").read_text())["state"] == "done"


def test_upload_too_large(make_client, media_dir, tmp_path):
    c = make_client(max_upload_mb=0.1)
    src = media_dir / "videos" / "bbaf2n.mpg"  # 442 KB
    r = upload(c, src)
    assert r.status_code == 413 and r.json() == {"error": "the video is larger than the upload limit (0.1 MB)"}
    # Without a Content-Length (chunked), the limit is enforced while the body streams in.
    boundary = "keeprtestboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"video\"; filename=\"a.mpg\"\r\n"
            "Content-Type: video/mpeg\r\n\r\n").encode()
    data = src.read_bytes()
    sent = []

    def body():
        yield head
        for k in range(0, len(data), 16384):
            sent.append(k)
            yield data[k:k + 16384]
        yield f"\r\n--{boundary}--\r\n".encode()

    r = c.post("/api/jobs", content=body(), headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 413 and "upload limit" in r.json()["error"]
    assert job_dirs(tmp_path / "jobs") == []  # nothing left of either


def test_upload_not_a_video(make_client, tmp_path):
    c = make_client()
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 50)
    png = tmp_path / "still.png"
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(png)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    for path in (text, png, empty):
        r = upload(c, path)
        assert r.status_code == 415, r.text
        msg = r.json()["error"]
        assert "\n" not in msg and str(tmp_path) not in msg and "Traceback" not in msg
    assert "still image" in upload(c, png).json()["error"]
    r = c.post("/api/jobs", files={"other": ("a.mp4", b"x")})
    assert r.status_code == 400 and "video" in r.json()["error"]
    r = c.post("/api/jobs", json={"video": "x"})
    assert r.status_code == 400 and "multipart" in r.json()["error"]
    assert job_dirs(tmp_path / "jobs") == []


def test_no_face(make_client, grid_frames, gradient_clip, tiny_models, tmp_path):
    import cv2

    c = make_client()
    job_id = upload(c, gradient_clip).json()["id"]
    j = wait_for(c, job_id, ["failed"])
    assert "no face found in any of 8 frame(s)" in j["error"] and str(gradient_clip.parent) not in j["error"]
    assert j["error"].startswith("the video: ")
    assert sorted(p.name for p in (tmp_path / "jobs" / job_id).iterdir()) == ["job.json"]
    # Faces too small for the tracking detector (upsample 0) but seen by the coverage detector: the advice.
    from webapp.config import infer_settings

    c2 = make_client(settings=infer_settings([str(tiny_models["config"])], ["--coverage.upsample", "1",
                                                                           "--coverage.identity", "false"]),
                     work_dir=tmp_path / "jobs2")
    small = [cv2.resize(f, (144, 116), interpolation=cv2.INTER_AREA) for f in grid_frames[:6]]
    job_id = upload(c2, write_clip(tmp_path / "small.mp4", small)).json()["id"]
    j = wait_for(c2, job_id, ["failed"])
    assert "use --detect.upsample 1" in j["error"] and "python -m webapp --detect.upsample" in j["error"], j["error"]


def test_unknown_job(make_client):
    c = make_client()
    unknown = str(uuid.uuid4())
    for method, url in (("GET", f"/api/jobs/{unknown}"), ("DELETE", f"/api/jobs/{unknown}"),
                        ("GET", "/api/jobs/not-a-uuid"), ("GET", "/api/jobs/..%2F..%2Fetc"),
                        ("GET", f"/api/jobs/{unknown}/original"), ("GET", f"/api/jobs/{unknown}/result/report.json"),
                        ("GET", f"/api/jobs/{unknown}/persons/0/grid.png"),
                        ("POST", f"/api/jobs/{unknown}/render")):
        r = c.request(method, url, json={"persons": [0], "parts": [1]} if method == "POST" else None)
        assert r.status_code == 404, (method, url, r.text)
        assert "error" in r.json()
    assert c.get("/nothing/here").status_code == 404


def test_cancel(make_client, media_dir, short_clip, tmp_path):
    c = make_client()
    work = tmp_path / "jobs"
    # Cancelled while tracking: the running step stops, the files go.
    job_id = upload(c, media_dir / "videos" / "bbaf2n.mpg").json()["id"]
    wait_for(c, job_id, ["tracking"], busy_ok=True)
    r = c.delete(f"/api/jobs/{job_id}")
    assert r.status_code == 200 and r.json() == {"id": job_id, "state": "cancelled"}
    assert c.get(f"/api/jobs/{job_id}").json()["state"] == "cancelled"
    deadline = time.time() + 20
    while job_id in job_dirs(work):
        assert time.time() < deadline, "the cancelled job's files are still there"
        time.sleep(0.1)
    # Cancelled while waiting for choices; the worker is free for the next job.
    job2 = upload(c, short_clip).json()["id"]
    wait_for(c, job2, ["choosing"])
    assert c.delete(f"/api/jobs/{job2}").status_code == 200
    assert job_dirs(work) == []
    assert c.post(f"/api/jobs/{job2}/render", json={"persons": [0], "parts": [1]}).status_code == 409


@pytest.fixture(scope="module")
def gradient_clip(tmp_path_factory):
    """8 frames of a moving gradient: no face."""
    yy, xx = np.mgrid[0:120, 0:160]
    frames = [np.stack([(xx + 4 * i) % 256, yy * 2 % 256, np.full_like(xx, 90)], -1).astype(np.uint8)
              for i in range(8)]
    return write_clip(tmp_path_factory.mktemp("clips") / "gradient.mp4", frames)


def test_expiry(make_client, short_clip, gradient_clip, tmp_path):
    c = make_client(expire_hours=1.0)
    manager = c.app.state.manager
    job_id = upload(c, short_clip).json()["id"]
    j = wait_for(c, job_id, ["choosing"])
    assert j["expires_at"] == pytest.approx(j["updated"] + 3600)
    assert manager.expire(now=time.time() + 1800) == []
    assert manager.expire(now=time.time() + 3601) == [job_id]
    assert c.get(f"/api/jobs/{job_id}").status_code == 404 and job_dirs(tmp_path / "jobs") == []
    # The reaper thread does it by itself.
    c2 = make_client(expire_hours=1.5 / 3600, work_dir=tmp_path / "jobs2")
    job_id = upload(c2, gradient_clip).json()["id"]
    deadline = time.time() + 90
    while c2.get(f"/api/jobs/{job_id}").status_code != 404:
        assert time.time() < deadline
        time.sleep(0.2)
    assert job_dirs(tmp_path / "jobs2") == []


def test_restart_with_unfinished_jobs(make_client, short_clip, tmp_path):
    work = tmp_path / "jobs"
    c = make_client(work_dir=work)
    done = upload(c, short_clip).json()["id"]
    wait_for(c, done, ["choosing"])
    make_client.close(c)  # the server stops (its workers end; the job stays as it was on disk)
    # A finished job, as render_video leaves it.
    meta = json.loads((work / done / "job.json").read_text())
    meta.update(state="done", result={"summary": "", "complete": True, "incomplete": [], "frames": 12, "seconds": 1})
    (work / done / "job.json").write_text(json.dumps(meta))
    (work / done / "result").mkdir()
    shutil.copy(short_clip, work / done / "result" / "anonymized.mp4")
    (work / done / "result" / "report.json").write_text("{}")
    # What a killed server leaves: jobs in every unfinished state (with partial files), an upload cut off.
    ids = {}
    for state in ("queued", "tracking", "choosing", "rendering"):
        ids[state] = job_id = str(uuid.uuid4())
        d = work / job_id
        shutil.copytree(work / done, d, ignore=shutil.ignore_patterns("result", "job.json"))
        (d / ".result.keepr-0-0-0-0.tmp").mkdir()
        (d / ".result.keepr-0-0-0-0.tmp" / "anonymized.mp4").write_bytes(b"half")
        meta = json.loads((work / done / "job.json").read_text())
        meta.update(id=job_id, state=state, result=None)
        (d / "job.json").write_text(json.dumps(meta))
    cut = work / str(uuid.uuid4())
    cut.mkdir()
    (cut / ".input.part").write_bytes(b"\0" * 100)

    c2 = make_client(work_dir=work)
    for state, job_id in ids.items():
        j = c2.get(f"/api/jobs/{job_id}").json()
        assert j["state"] == "failed" and f"stopped while this job was {state}" in j["error"], j
        assert j["persons"] == [] and j["result"] is None
        assert sorted(p.name for p in (work / job_id).iterdir()) == ["job.json"]
        assert c2.get(f"/api/jobs/{job_id}/result/anonymized.mp4").status_code == 409
    assert not cut.exists()
    j = c2.get(f"/api/jobs/{done}").json()
    assert j["state"] == "done" and c2.get(j["result"]["video"]).status_code == 200


def test_two_uploads_queue_and_finish(make_client, short_clip):
    c = make_client(workers=1)
    ids, errors = [], []

    def send():
        r = upload(c, short_clip)
        (ids if r.status_code == 201 else errors).append(r.json())

    threads = [threading.Thread(target=send) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(ids) == 2
    ids = [d["id"] for d in ids]
    jobs = [c.get(f"/api/jobs/{i}").json() for i in ids]
    states = sorted(j["state"] for j in jobs)
    assert states in (["queued", "tracking"], ["queued", "queued"]), states  # tracking takes seconds
    assert sorted(j["queue_position"] for j in jobs if j["state"] == "queued")[-1] in (1, 2), jobs
    deadline = time.time() + 180
    while True:
        t0 = time.perf_counter()
        jobs = [c.get(f"/api/jobs/{i}").json() for i in ids]
        waited = time.perf_counter() - t0
        assert waited < 5.0, waited  # the server answers while a job runs (2 busy shared cores here)
        running = [j for j in jobs if j["state"] == "tracking"]
        assert len(running) <= 1, jobs  # one worker: one job at a time
        if all(j["state"] == "choosing" and not j["busy"] for j in jobs):
            break
        assert time.time() < deadline, jobs
        time.sleep(0.05)
    for i in ids:
        assert c.post(f"/api/jobs/{i}/render", json={"persons": [0], "parts": [1, 2, 5]}).status_code == 202
    second = c.get(f"/api/jobs/{ids[1]}").json()
    assert second["state"] == "rendering" and second["queue_position"] in (1, 2), second  # waits
    for i in ids:
        j = wait_for(c, i, ["done"], timeout=180)
        assert j["result"]["frames"] == 12
