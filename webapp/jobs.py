"""Jobs: one uploaded video each, worked on by background worker threads on the library's pipeline steps.

A job goes ``queued`` -> ``tracking`` (pass 1, :func:`anonymizer.pipeline.track_faces`, then one
:func:`anonymizer.pipeline.virtual_faces` per person) -> ``choosing`` (the user ticks people, picks candidates,
asks for new seeds, ticks parts) -> ``rendering`` (:func:`anonymizer.pipeline.render_video`) -> ``done``; or
``failed`` (a one-line message) or ``cancelled`` (its files removed). Every piece of work is a task in one FIFO
queue; ``workers`` threads take tasks, never two of the same job at once. The server's request handlers only read
and queue, so it stays responsive while a job runs.

Files: each job has its own directory ``WORK_DIR/<uuid4>/``: ``job.json`` (its state, written atomically on every
change), ``input`` (the upload, under a fixed name), ``preview.mp4`` (a browser-playable H.264/AAC copy when the
browser cannot play the upload), ``thumb_<person>.png``, ``grid_<person>.png``, ``overlay_<person>.png`` and
``result/`` (``anonymized.mp4``, ``report.json``... written into a temporary directory renamed into place by
``render_video``). A failed job keeps only ``job.json``; a cancelled or expired job keeps nothing. On start,
a job directory left in any state but ``done`` or ``failed`` (the server stopped under it) becomes ``failed``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from anonymizer.pipeline import (
    Cancelled,
    check_input,
    make_target,
    render_video,
    summary_line,
    track_faces,
    virtual_faces,
)
from anonymizer.scan import no_face_message
from anonymizer.streams import plan_streams
from anonymizer.video import VideoReader
from anonymizer.video_writer import VideoWriter
from keepr.errors import KeeprError
from webapp.images import part_overlay, segment_labels, write_png

log = logging.getLogger("webapp")

STATES = ("queued", "tracking", "choosing", "rendering", "done", "failed", "cancelled")
FINISHED = ("done", "failed", "cancelled")
INPUT = "input"
PREVIEW = "preview.mp4"
RESULT = "result"
# (container format, video codecs, audio codecs, MIME type) a browser plays as they are.
PLAYABLE = [({"mov", "mp4"}, {"h264"}, {None, "aac", "mp3"}, "video/mp4"),
            ({"webm", "matroska"}, {"vp8", "vp9", "av1"}, {None, "opus", "vorbis"}, "video/webm")]
SERVER_ERROR = "internal error while {what}; the server log has the details"


def one_line(text) -> str:
    return " ".join(str(text).split())


def browser_mime(info) -> str | None:
    """MIME type under which a browser can play the upload as it is, or None (a preview is needed)."""
    formats = set(info.format.split(","))
    if info.num_audio_streams > 1:
        return None
    for fmts, vcodecs, acodecs, mime in PLAYABLE:
        if formats & fmts and info.codec in vcodecs and info.audio_codec in acodecs:
            return mime
    return None


def is_job_id(text: str) -> bool:
    try:
        return str(uuid.UUID(text, version=4)) == text
    except (ValueError, AttributeError, TypeError):
        return False


@dataclass
class Task:
    job_id: str
    kind: str  # 'track' | 'face' | 'render'
    args: dict = field(default_factory=dict)

    def describe(self) -> str:
        if self.kind == "face":
            return f"new candidates for person {self.args['person']}"
        return {"track": "finding faces", "render": "rendering"}[self.kind]


class Job:
    """What the page and the API see of one upload (``public()``), and the objects the pipeline steps share."""

    KEYS = ("id", "state", "error", "name", "created", "updated", "video", "original", "persons", "parts",
            "result", "warnings", "version")

    def __init__(self, job_id: str, directory: Path, name: str = ""):
        self.id, self.dir, self.name = job_id, directory, name
        self.state, self.error = "queued", None
        self.created = self.updated = time.time()
        self.video: dict = {}  # the upload's properties
        self.original: dict = {"status": "pending", "mime": None, "file": None}
        self.persons: list[dict] = []
        self.parts: list[int] = []
        self.result: dict | None = None
        self.warnings: list[str] = []
        self.version = 0  # bumped when a picture changes (cache buster in its URL)
        self.progress: dict = {}
        self.busy: str | None = None  # a task of this job queued or running while it is 'choosing'
        # Runtime only (lost on restart, which fails the job).
        self.cancel = threading.Event()
        self.checked = None
        self.scan = None
        self.vfs: dict[int, object] = {}

    # -- persistence -----------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in self.KEYS}

    @classmethod
    def from_json(cls, directory: Path, d: dict) -> "Job":
        job = cls(d["id"], directory, d.get("name", ""))
        for k in cls.KEYS:
            if k in d:
                setattr(job, k, d[k])
        return job

    def save(self) -> None:
        """job.json, via a temporary name renamed into place (a crash never leaves half of it)."""
        if not self.dir.is_dir():
            return
        path = self.dir / "job.json"
        tmp = self.dir / ".job.json.tmp"
        tmp.write_text(json.dumps(self.to_json(), indent=1))
        os.replace(tmp, path)

    def person(self, pid: int) -> dict | None:
        return next((p for p in self.persons if p["id"] == pid), None)

    # -- API view --------------------------------------------------------------------------------------------
    def public(self, queue_position: int | None, expires_at: float | None, num_segments: int) -> dict:
        base = f"/api/jobs/{self.id}"
        v = self.version
        persons = []
        for p in self.persons:
            q = dict(p)
            q["thumbnail"] = f"{base}/persons/{p['id']}/thumbnail.png?v={v}"
            q["grid"] = f"{base}/persons/{p['id']}/grid.png?v={v}" if p.get("candidates") else None
            q["overlay"] = f"{base}/persons/{p['id']}/overlay.png?v={v}" if p.get("segments") else None
            persons.append(q)
        result = None
        if self.result is not None:
            result = dict(self.result, video=f"{base}/result/anonymized.mp4",
                          video_download=f"{base}/result/anonymized.mp4?download=1",
                          report=f"{base}/result/report.json?download=1")
        original = dict(self.original)
        original.pop("file", None)
        original["url"] = f"{base}/original" if original["status"] == "ready" else None
        return {
            "id": self.id, "state": self.state, "error": self.error, "name": self.name,
            "created": self.created, "updated": self.updated, "expires_at": expires_at,
            "queue_position": queue_position, "busy": self.busy,
            "progress": {k: v for k, v in self.progress.items() if k != "started"},
            "video": self.video, "original": original, "persons": persons, "parts": self.parts,
            "num_segments": num_segments, "result": result, "warnings": self.warnings,
        }


class _PreviewTee(VideoReader):
    """The job's reader, whose pass also writes a browser-playable H.264/AAC copy (``preview.mp4``) of the
    upload, so the page can play an original the browser cannot (MPEG-1, AVI...) without a second decode."""

    def __init__(self, reader: VideoReader, job: Job):  # not super().__init__: that would probe the file again
        self.__dict__.update(reader.__dict__)
        self._job = job

    def __iter__(self):
        job = self._job
        final, tmp = job.dir / PREVIEW, job.dir / f".{PREVIEW}.tmp.mp4"
        try:
            writer = VideoWriter(tmp, self.width, self.height, self.fps, start_time=self.start_time, crf=23,
                                 preset="veryfast", plan=plan_streams(self, "aac" if self.has_audio else "none"))
        except KeeprError as exc:
            log.warning("job %s: no preview: %s", job.id, one_line(exc))
            job.original.update(status="unavailable")
            yield from VideoReader.__iter__(self)
            return
        ok = True
        with writer:
            for f in VideoReader.__iter__(self):
                if ok:
                    try:
                        writer.write(f.image)
                    except (KeeprError, ValueError) as exc:
                        log.warning("job %s: preview stopped: %s", job.id, one_line(exc))
                        ok = False
                yield f
        if ok:
            os.replace(tmp, final)
            job.original.update(status="ready", mime="video/mp4", file=PREVIEW)
        else:
            tmp.unlink(missing_ok=True)
            job.original.update(status="unavailable")


class JobManager:
    """The jobs of one work root, their task queue and worker threads, expiry and restart recovery."""

    def __init__(self, config, models):
        self.config = config
        self.settings = config.settings
        self.models = models
        self.root = Path(config.work_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.jobs: dict[str, Job] = {}
        self.lock = threading.RLock()
        self.cv = threading.Condition(self.lock)
        self.pending: list[Task] = []
        self.running: dict[str, Task] = {}
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        self.num_segments = int(getattr(models.coseg, "num_segments", 0)) if models is not None else 0
        self.default_parts = [p for p in self.settings.swap.parts if 1 <= p <= self.num_segments]
        self.recover()

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> None:
        for k in range(max(1, int(self.config.workers))):
            t = threading.Thread(target=self._worker, name=f"webapp-worker-{k}", daemon=True)
            t.start()
            self.threads.append(t)
        t = threading.Thread(target=self._reaper, name="webapp-expiry", daemon=True)
        t.start()
        self.threads.append(t)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the workers: a running task stops at its next frame, its job is failed (as on a restart)."""
        self.stopping.set()
        with self.cv:
            self.cv.notify_all()
        for t in self.threads:
            t.join(timeout)
        self.threads = []

    def recover(self) -> None:
        """Load the work root: done and failed jobs as they were; anything unfinished becomes failed (its partial
        files removed); directories without a readable job.json (an upload cut off) are removed."""
        for d in sorted(self.root.iterdir()):
            if not d.is_dir() or not is_job_id(d.name):
                continue
            try:
                job = Job.from_json(d, json.loads((d / "job.json").read_text()))
                if job.id != d.name or job.state not in STATES:
                    raise ValueError("job.json does not match its directory")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("removing %s: no usable job.json (%s)", d, one_line(exc))
                shutil.rmtree(d, ignore_errors=True)
                continue
            if job.state == "cancelled":
                shutil.rmtree(d, ignore_errors=True)
                continue
            if job.state == "done" and not all((d / RESULT / n).is_file() for n in ("anonymized.mp4", "report.json")):
                job.state, job.error = "failed", "the result files are missing"
            if job.state not in FINISHED:
                job.error = (f"the server stopped while this job was {job.state}; nothing of it was kept: upload the "
                             "video again")
                job.state = "failed"
            if job.state == "failed":
                self._clear_files(job)
                job.persons, job.result, job.original = [], None, {"status": "unavailable", "mime": None,
                                                                   "file": None}
                job.save()
            job.progress = {}
            self.jobs[job.id] = job

    # -- uploads ---------------------------------------------------------------------------------------------
    def new_upload(self) -> tuple[str, Path]:
        """A fresh uuid4 id and its (new, empty) directory."""
        while True:
            job_id = str(uuid.uuid4())
            d = self.root / job_id
            try:
                d.mkdir()
                return job_id, d
            except FileExistsError:
                continue

    def discard(self, directory: Path) -> None:
        shutil.rmtree(directory, ignore_errors=True)

    def add(self, job_id: str, directory: Path, name: str, info) -> Job:
        """Register an accepted upload (``directory/input``, probed as ``info``) and queue its tracking."""
        job = Job(job_id, directory, name)
        job.video = {"width": info.width, "height": info.height, "fps": round(float(info.fps), 3),
                     "frames": info.expected_frames()[0], "duration": info.duration, "codec": info.codec,
                     "format": info.format, "audio": info.audio_codec}
        mime = browser_mime(info)
        job.original = ({"status": "ready", "mime": mime, "file": INPUT} if mime else
                        {"status": "pending", "mime": None, "file": None})
        job.parts = list(self.default_parts)
        job.save()
        with self.cv:
            self.jobs[job_id] = job
            self.pending.append(Task(job_id, "track"))
            self.cv.notify()
        return job

    # -- queries ---------------------------------------------------------------------------------------------
    def get(self, job_id: str) -> Job | None:
        with self.lock:
            return self.jobs.get(job_id)

    def queue_position(self, job_id: str) -> int | None:
        """1 + the number of tasks ahead of this job's next task in the queue (None: nothing of it waits)."""
        with self.lock:
            for k, t in enumerate(self.pending):
                if t.job_id == job_id:
                    return k + 1
        return None

    def public(self, job: Job) -> dict:
        exp = None if job.state in ("queued", "tracking", "rendering") else job.updated + self.config.expire_seconds
        return job.public(self.queue_position(job.id), exp, self.num_segments)

    # -- requests from the page ------------------------------------------------------------------------------
    def request_face(self, job: Job, pid: int, candidate: int | None = None, seed: int | None = None) -> None:
        """Queue new candidates for person ``pid`` (``seed``) or pick candidate ``candidate`` of their grid."""
        with self.cv:
            self._check_choosing(job)
            p = job.person(pid)
            if p is None:
                raise LookupError(f"no person {pid} in this job")
            if candidate is not None:
                n = int(self.settings.virtual_face.num_candidates)
                if not 0 <= candidate < n:
                    raise ValueError(f"candidate must be 0..{n - 1}, got {candidate}")
                if not p.get("candidates"):
                    raise ValueError(f"person {pid} has no candidates to pick from; ask for new ones")
            job.busy = Task(job.id, "face", {"person": pid}).describe()
            self.pending.append(Task(job.id, "face", {"person": pid, "candidate": candidate,
                                                      "seed": p["seed"] if seed is None else int(seed)}))
            self._touch(job)
            self.cv.notify()

    def request_render(self, job: Job, persons: list[int], parts: list[int]) -> None:
        with self.cv:
            self._check_choosing(job)
            known = {p["id"] for p in job.persons}
            if not persons:
                raise ValueError("tick at least one person to anonymize")
            if bad := sorted(set(persons) - known):
                raise ValueError(f"no person {', '.join(map(str, bad))} in this job")
            if not parts:
                raise ValueError("tick at least one face part to swap")
            if bad := [k for k in parts if not 1 <= k <= self.num_segments]:
                raise ValueError(f"part(s) {', '.join(map(str, bad))} out of range: the co-part model has parts "
                                 f"1..{self.num_segments}")
            job.parts = sorted(set(parts))
            for p in job.persons:
                p["selected"] = p["id"] in persons
            job.state, job.progress = "rendering", {"stage": "waiting"}
            self.pending.append(Task(job.id, "render", {"persons": sorted(set(persons)), "parts": job.parts}))
            self._touch(job)
            job.save()
            self.cv.notify()

    def _check_choosing(self, job: Job) -> None:
        if job.state != "choosing":
            raise RuntimeError(f"this job is {job.state}, not waiting for choices")
        if job.busy:
            raise RuntimeError(f"this job is busy ({job.busy}); try again when it is done")

    def cancel(self, job_id: str) -> Job | None:
        """Cancel a job and remove its files (now, or when its running step stops, within a frame)."""
        with self.cv:
            job = self.jobs.get(job_id)
            if job is None or job.state == "cancelled":
                return job
            job.cancel.set()
            job.state, job.error, job.busy, job.progress = "cancelled", None, None, {}
            job.persons, job.result = [], None
            self.pending = [t for t in self.pending if t.job_id != job_id]
            self._touch(job)
            running = job_id in self.running
        if not running:
            self._remove(job)
        return job

    # -- expiry ----------------------------------------------------------------------------------------------
    def expire(self, now: float | None = None) -> list[str]:
        """Remove jobs (and their files) unchanged for ``expire_hours``; never one that runs or waits in the
        queue. Returns their ids."""
        now = time.time() if now is None else now
        limit = self.config.expire_seconds
        with self.lock:
            busy = set(self.running) | {t.job_id for t in self.pending}
            old = [j for j in self.jobs.values() if j.id not in busy and now - j.updated > limit]
            for j in old:
                del self.jobs[j.id]
                j.cancel.set()
        for j in old:
            log.info("job %s expired", j.id)
            self._remove(j)
        return [j.id for j in old]

    def _reaper(self) -> None:
        period = min(60.0, max(0.5, self.config.expire_seconds / 4))
        while not self.stopping.wait(period):
            try:
                self.expire()
            except Exception:  # noqa: BLE001 - the reaper must survive anything
                log.exception("expiring jobs failed")

    # -- the worker ------------------------------------------------------------------------------------------
    def _next_task(self) -> Task | None:
        with self.cv:
            while not self.stopping.is_set():
                for k, t in enumerate(self.pending):
                    if t.job_id not in self.running:
                        del self.pending[k]
                        self.running[t.job_id] = t
                        return t
                self.cv.wait(0.5)
        return None

    def _worker(self) -> None:
        while (task := self._next_task()) is not None:
            job = self.get(task.job_id)
            try:
                if job is not None and not job.cancel.is_set():
                    self._run(task, job)
            finally:
                with self.cv:
                    self.running.pop(task.job_id, None)
                    if job is not None and not job.cancel.is_set() and not any(
                            t.job_id == job.id for t in self.pending):
                        job.busy = None
                    self.cv.notify_all()
                if job is not None and job.cancel.is_set():
                    self._remove(job)

    def _run(self, task: Task, job: Job) -> None:
        what = task.describe()
        try:
            if task.kind == "track":
                self._track(job)
            elif task.kind == "face":
                self._face(job, **task.args)
            elif task.kind == "render":
                self._render(job, **task.args)
        except Cancelled:
            if job.cancel.is_set():
                log.info("job %s: cancelled while %s", job.id, what)
            else:  # the server is stopping
                self._fail(job, f"the server stopped while this job was {job.state}; upload the video again")
        except KeeprError as exc:
            log.info("job %s failed while %s: %s", job.id, what, one_line(exc))
            self._fail(job, self._user_text(job, exc))
        except Exception:  # noqa: BLE001 - the page gets a message, the log the traceback
            log.exception("job %s: error while %s", job.id, what)
            self._fail(job, SERVER_ERROR.format(what=what))

    def _cancelled(self, job: Job):
        return lambda: job.cancel.is_set() or self.stopping.is_set()

    def _progress(self, job: Job, names: dict | None = None):
        def update(stage: str, done: int, total: int | None) -> None:
            stage = (names or {}).get(stage, stage)
            now = time.monotonic()
            p = job.progress
            started = p["started"] if p.get("stage") == stage and "started" in p else now
            elapsed = now - started
            eta = elapsed / done * (total - done) if done and total and total >= done else None
            job.progress = {"stage": stage, "done": int(done), "total": None if total is None else int(total),
                            "elapsed_s": round(elapsed, 1), "eta_s": None if eta is None else round(eta, 1),
                            "per_s": round(done / elapsed, 2) if elapsed > 0 and done else None, "started": started}
        return update

    def _set_state(self, job: Job, state: str, **kw) -> None:
        with self.lock:
            if job.cancel.is_set():
                raise Cancelled("cancelled")
            job.state = state
            for k, v in kw.items():
                setattr(job, k, v)
            self._touch(job)
            job.save()

    def _track(self, job: Job) -> None:
        s, models = self.settings, self.models
        self._set_state(job, "tracking", progress={"stage": "checking the video"})
        checked = check_input(job.dir / INPUT, s)
        job.checked = checked
        reader = checked.reader if job.original["status"] == "ready" else _PreviewTee(checked.reader, job)
        scan = track_faces(reader, s, models.recognizer, progress=self._progress(job, {"track": "finding faces"}),
                           cancel=self._cancelled(job))
        if scan.truncation:
            job.warnings.append(self._user_text(job, reader.truncation_message()))
        if not scan.persons:
            raise KeeprError(no_face_message(scan, s) + ". Restart the app with that detector option (python -m "
                             "webapp --detect.upsample N ...) to find smaller faces.")
        job.scan = scan
        fps = float(checked.reader.fps)
        persons = []
        for p in scan.persons:
            thumb = p.thumbnail(160)
            if thumb is not None:
                write_png(job.dir / f"thumb_{p.id}.png", thumb)
            t0, t1 = scan.stamps[p.first_index][0], scan.stamps[p.last_index][0]
            persons.append({"id": p.id, "first_frame": p.first_index, "last_frame": p.last_index,
                            "start_s": round(t0 if t0 is not None else p.first_index / fps, 3),
                            "end_s": round(t1 if t1 is not None else p.last_index / fps, 3),
                            "frames": p.last_index - p.first_index + 1, "selected": True,
                            "seed": int(s.seed + p.id), "candidates": [], "chosen": None, "reason": None,
                            "segments": []})
        self._set_state(job, "tracking", persons=persons)
        update = self._progress(job)
        for k, p in enumerate(scan.persons):
            update("virtual faces", k, len(scan.persons))
            self._make_face(job, p, persons[k]["seed"], None)
        update("virtual faces", len(scan.persons), len(scan.persons))
        self._set_state(job, "choosing", progress={})

    def _face(self, job: Job, person: int, candidate: int | None, seed: int) -> None:
        p = next(q for q in job.scan.persons if q.id == person)
        job.progress = {"stage": job.busy}
        self._make_face(job, p, seed, candidate)
        self._set_state(job, "choosing", progress={})

    def _make_face(self, job: Job, person, seed: int, candidate: int | None) -> None:
        """Person's virtual face (seed, candidate or the default choice): grid, co-part overlay, entry."""
        s, models = self.settings, self.models
        cands = None if candidate is None else {person.id: candidate}
        vf = virtual_faces([person], models, s, seeds={person.id: seed}, candidates=cands)[person.id]
        if self._cancelled(job)():
            raise Cancelled("cancelled")
        entry = job.person(person.id)
        entry["seed"] = int(seed)
        job.vfs[person.id] = vf
        if isinstance(vf, str):
            entry.update(candidates=[], chosen=None, reason=self._user_text(job, vf), segments=[])
        else:
            write_png(job.dir / f"grid_{person.id}.png", vf.grid)
            target = make_target(person, vf, models, s, job.scan.num_frames)
            labels = segment_labels(target.source_crop, models.coseg)
            overlay, segments = part_overlay(target.source_crop, labels, self.num_segments)
            write_png(job.dir / f"overlay_{person.id}.png", overlay)
            entry.update(candidates=vf.report["candidates"], chosen=int(vf.chosen), chosen_why=vf.report["chosen_why"],
                         reason=None, segments=segments)
        with self.lock:
            job.version += 1
            self._touch(job)
            job.save()

    def _render(self, job: Job, persons: list[int], parts: list[int]) -> None:
        base = self.settings
        s = dataclasses.replace(base, swap=dataclasses.replace(base.swap, parts=list(parts)))
        checked = dataclasses.replace(job.checked, settings=s)
        scan = job.scan
        selected = [p for p in scan.persons if p.id in persons]
        self._set_state(job, "rendering", progress={"stage": "rendering", "done": 0, "total": scan.num_frames,
                                                       "elapsed_s": 0.0, "eta_s": None, "started": time.monotonic()})
        t0 = time.monotonic()
        report = render_video(checked, job.dir / RESULT, scan, selected, {p.id: job.vfs[p.id] for p in selected},
                              self.models, every_person=len(selected) == len(scan.persons),
                              command=["python -m webapp", f"persons={persons}", f"parts={list(parts)}"],
                              progress=self._progress(job, {"render": "rendering"}), cancel=self._cancelled(job))
        result = {"summary": summary_line(report, ""), "complete": bool(report["complete"]),
                  "incomplete": list(report.get("incomplete") or []), "frames": report["totals"]["frames"],
                  "seconds": round(time.monotonic() - t0, 1)}
        job.scan, job.checked, job.vfs = None, None, {}
        self._set_state(job, "done", result=result, busy=None,
                        progress=dict(job.progress, done=result["frames"], eta_s=0))

    # -- helpers ---------------------------------------------------------------------------------------------
    def _user_text(self, job: Job, text) -> str:
        """A message for the page: one line, the server's paths replaced by what they are."""
        text = one_line(text)
        for path, name in ((job.dir / INPUT, "the video"), (job.dir / RESULT, "the result"), (job.dir, "the job")):
            text = text.replace(f"{path}: ", f"{name}: ").replace(str(path), name)
        return text

    def _fail(self, job: Job, message: str) -> None:
        with self.lock:
            if job.cancel.is_set():
                return
            job.state, job.error, job.busy = "failed", message, None
            job.progress, job.persons, job.result = {}, [], None
            job.original = {"status": "unavailable", "mime": None, "file": None}
            job.scan, job.checked, job.vfs = None, None, {}
            self._touch(job)
        self._clear_files(job)
        job.save()

    def _touch(self, job: Job) -> None:
        job.updated = time.time()

    def _clear_files(self, job: Job) -> None:
        """Everything of a job's directory but job.json."""
        if not job.dir.is_dir():
            return
        for p in job.dir.iterdir():
            if p.name == "job.json":
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)

    def _remove(self, job: Job) -> None:
        job.scan, job.checked, job.vfs = None, None, {}
        shutil.rmtree(job.dir, ignore_errors=True)
