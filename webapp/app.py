"""The FastAPI app: the page, its static files and the JSON API.

Routes (every error is ``{"error": "<one line>"}`` with its status; details only in the server log):

- ``GET /``: the page; ``GET /static/...``: its script and style (served from ``webapp/static``).
- ``GET /api/info``: demo banner, upload limit, parts of the co-part model, candidates per person.
- ``POST /api/jobs`` (multipart field ``video``) -> 201 ``{"id": uuid4}``; 413 over the upload limit (checked on
  ``Content-Length`` and again while the body streams in), 415 not a video, 400 no ``video`` field. A refused
  upload leaves nothing on disk.
- ``GET /api/jobs/{id}``: state, progress, queue position, video, persons (time range, candidates with distance and
  status, chosen one, parts of the overlay), result; 404 for an unknown (or expired) id.
- ``DELETE /api/jobs/{id}``: cancel and remove the job's files -> ``{"id", "state": "cancelled"}``.
- ``GET /api/jobs/{id}/original``: the upload (or its H.264 preview when the browser cannot play it).
- ``GET /api/jobs/{id}/persons/{pid}/thumbnail.png | grid.png | overlay.png``.
- ``POST /api/jobs/{id}/persons/{pid}/candidate`` ``{"candidate": k}``: use candidate k of the person's grid.
- ``POST /api/jobs/{id}/persons/{pid}/seed`` ``{"seed": s}`` (optional): 9 new candidates with a new seed.
- ``POST /api/jobs/{id}/render`` ``{"persons": [ids], "parts": [1, 2, 5]}``: render the chosen people.
- ``GET /api/jobs/{id}/result/anonymized.mp4 | report.json`` (``?download=1``: as an attachment).
"""
from __future__ import annotations

import contextlib
import logging
import secrets
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from anonymizer.pipeline import load_models
from anonymizer.video import probe_video
from keepr.errors import KeeprError
from webapp.jobs import INPUT, RESULT, JobManager, is_job_id, one_line

log = logging.getLogger("webapp")
STATIC = Path(__file__).resolve().parent / "static"
MULTIPART_SLACK = 64 * 1024  # multipart headers and boundaries on top of the file itself


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class CandidateChoice(BaseModel):
    candidate: int


class SeedChoice(BaseModel):
    seed: int | None = None


class RenderChoice(BaseModel):
    persons: list[int]
    parts: list[int]


class _UploadSink:
    """python-multipart callbacks writing the ``video`` field to a file, counting bytes against the limit."""

    def __init__(self, path: Path, limit: int):
        self.path, self.limit = path, limit
        self.file = None
        self.size = 0
        self.found = False
        self.too_large = False
        self.filename = ""
        self._field, self._value, self._headers = b"", b"", {}

    def callbacks(self) -> dict:
        return {"on_header_field": self._on_field, "on_header_value": self._on_value,
                "on_header_end": self._on_header_end, "on_headers_finished": self._on_headers_finished,
                "on_part_data": self._on_data, "on_part_end": self._on_part_end}

    def _on_field(self, data, start, end):
        self._field += data[start:end]

    def _on_value(self, data, start, end):
        self._value += data[start:end]

    def _on_header_end(self):
        self._headers[self._field.decode("latin-1").lower()] = self._value
        self._field, self._value = b"", b""

    def _on_headers_finished(self):
        from python_multipart.multipart import parse_options_header  # optional (python-multipart): uploads only

        _, opts = parse_options_header(self._headers.get("content-disposition", b""))
        self._headers = {}
        if opts.get(b"name") == b"video" and not self.found and self.file is None:
            self.filename = opts.get(b"filename", b"").decode("utf-8", "replace")
            self.file = open(self.path, "wb")

    def _on_data(self, data, start, end):
        if self.file is None or self.too_large:
            return
        self.size += end - start
        if self.size > self.limit:
            self.too_large = True
            return
        self.file.write(data[start:end])

    def _on_part_end(self):
        if self.file is not None:
            self.file.close()
            self.file = None
            self.found = True

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None


def display_name(filename: str) -> str:
    """The upload's file name for showing only (never used in a path): its last component, printable, short."""
    name = filename.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if c.isprintable())
    return name[:100] or "video"


def create_app(config, models=None, manager: JobManager | None = None, start_workers: bool = True) -> FastAPI:
    """The app for ``config`` (:class:`webapp.config.AppConfig`); ``models`` (``anonymizer.pipeline.Models``) are
    loaded here when not given (once per process: pass them to share them between apps, as the tests do)."""
    if manager is None:
        if models is None:
            models = load_models(config.settings.models, config.settings.swap.device)
        manager = JobManager(config, models)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if start_workers:
            manager.start()
        try:
            yield
        finally:
            await run_in_threadpool(manager.stop)

    app = FastAPI(title="KEEP:R", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.manager = manager
    app.state.config = config

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error(exc.status, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        msg = exc.detail if isinstance(exc.detail, str) else "request refused"
        if exc.status_code == 404 and msg == "Not Found":
            msg = "not found"
        return error(exc.status_code, msg)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        parts = []
        for e in exc.errors()[:3]:
            where = ".".join(str(x) for x in e.get("loc", ())[1:]) or "body"
            parts.append(f"{where}: {e.get('msg', 'invalid')}")
        return error(422, "bad request: " + "; ".join(parts))

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception):
        log.exception("error on %s %s", request.method, request.url.path)
        return error(500, "internal server error; the server log has the details")

    @app.middleware("http")
    async def _headers(request: Request, call_next):
        response = await call_next(request)
        # Nothing of the page may come from elsewhere (and no page elsewhere may frame it).
        response.headers.setdefault("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; "
                                    "media-src 'self' blob:; frame-ancestors 'none'")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        if request.url.path.startswith("/api/"):
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    def job_or_404(job_id: str):
        job = manager.get(job_id) if is_job_id(job_id) else None
        if job is None:
            raise ApiError(404, "unknown job (wrong id, or expired and removed)")
        return job

    # -- the page ---------------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return Response(status_code=204)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/info")
    async def info():
        s = config.settings
        return {"banner": config.banner, "demo": config.banner is not None, "max_upload_mb": config.max_upload_mb,
                "num_segments": manager.num_segments, "default_parts": manager.default_parts,
                "num_candidates": s.virtual_face.num_candidates, "workers": config.workers,
                "expire_hours": config.expire_hours,
                "detector": {"detector": s.detect.detector, "upsample": s.detect.upsample},
                "formats": ["mp4", "mov", "mkv", "webm", "avi", "mpg"]}

    # -- jobs -------------------------------------------------------------------------------------------------
    @app.post("/api/jobs", status_code=201)
    async def create_job(request: Request):
        from python_multipart.multipart import MultipartParser, parse_options_header  # optional (python-multipart)

        limit = config.max_upload_bytes
        too_large = f"the video is larger than the upload limit ({config.max_upload_mb:g} MB)"
        ctype, opts = parse_options_header(request.headers.get("content-type", ""))
        if ctype != b"multipart/form-data" or not opts.get(b"boundary"):
            raise ApiError(400, "send the video as multipart/form-data in the field 'video'")
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit + MULTIPART_SLACK:
            raise ApiError(413, too_large)
        job_id, directory = manager.new_upload()
        path = directory / f".{INPUT}.part"
        sink = _UploadSink(path, limit)
        accepted = False
        try:
            parser = MultipartParser(opts[b"boundary"], sink.callbacks())
            async for chunk in request.stream():
                parser.write(chunk)
                if sink.too_large:
                    raise ApiError(413, too_large)
            parser.finalize()
            sink.close()
            if not sink.found:
                raise ApiError(400, "no file in the field 'video'")
            if sink.size == 0:
                raise ApiError(415, "the file is empty")
            try:
                info = await run_in_threadpool(_probe, path)
            except KeeprError as exc:
                msg = one_line(exc).replace(str(path), "the file")
                raise ApiError(415, f"not a video this app can read: {msg}") from None
            path.rename(directory / INPUT)
            manager.add(job_id, directory, display_name(sink.filename), info)
            accepted = True
            log.info("job %s: accepted %d bytes", job_id, sink.size)
            return JSONResponse({"id": job_id}, status_code=201)
        except ApiError:
            raise
        except Exception as exc:  # noqa: BLE001 - a broken multipart body, a disk error...
            log.warning("upload refused: %s", one_line(exc))
            raise ApiError(400, "the upload could not be read (interrupted, or not multipart/form-data)") from None
        finally:
            sink.close()
            if not accepted:
                manager.discard(directory)

    @app.get("/api/jobs/{job_id}")
    async def get_job(job_id: str):
        return manager.public(job_or_404(job_id))

    @app.delete("/api/jobs/{job_id}")
    async def delete_job(job_id: str):
        job = job_or_404(job_id)
        await run_in_threadpool(manager.cancel, job.id)
        return {"id": job.id, "state": "cancelled"}

    @app.get("/api/jobs/{job_id}/original")
    async def original(job_id: str):
        job = job_or_404(job_id)
        o = job.original
        if o.get("status") != "ready" or not o.get("file") or not (job.dir / o["file"]).is_file():
            raise ApiError(404, "no playable original yet")
        return FileResponse(job.dir / o["file"], media_type=o.get("mime") or "video/mp4")

    @app.get("/api/jobs/{job_id}/persons/{pid}/{kind}.png")
    async def person_image(job_id: str, pid: int, kind: str):
        job = job_or_404(job_id)
        names = {"thumbnail": "thumb", "grid": "grid", "overlay": "overlay"}
        if kind not in names or job.person(pid) is None:
            raise ApiError(404, "no such picture")
        path = job.dir / f"{names[kind]}_{int(pid)}.png"
        if not path.is_file():
            raise ApiError(404, "no such picture")
        return FileResponse(path, media_type="image/png")

    def _request(fn, *args):
        try:
            fn(*args)
        except LookupError as exc:
            raise ApiError(404, str(exc)) from None
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        except RuntimeError as exc:
            raise ApiError(409, str(exc)) from None

    @app.post("/api/jobs/{job_id}/persons/{pid}/candidate", status_code=202)
    async def pick_candidate(job_id: str, pid: int, body: CandidateChoice):
        job = job_or_404(job_id)
        _request(manager.request_face, job, pid, body.candidate, None)
        return manager.public(job)

    @app.post("/api/jobs/{job_id}/persons/{pid}/seed", status_code=202)
    async def new_seed(job_id: str, pid: int, body: SeedChoice | None = None):
        job = job_or_404(job_id)
        seed = body.seed if body is not None and body.seed is not None else secrets.randbelow(2 ** 31)
        if not 0 <= seed < 2 ** 32:
            raise ApiError(400, "seed must be 0..2^32-1")
        _request(manager.request_face, job, pid, None, seed)
        return manager.public(job)

    @app.post("/api/jobs/{job_id}/render", status_code=202)
    async def render(job_id: str, body: RenderChoice):
        job = job_or_404(job_id)
        _request(manager.request_render, job, body.persons, body.parts)
        return manager.public(job)

    @app.get("/api/jobs/{job_id}/result/{name}")
    async def result(job_id: str, name: str, download: int = 0):
        job = job_or_404(job_id)
        files = {"anonymized.mp4": "video/mp4", "report.json": "application/json"}
        if name not in files:
            raise ApiError(404, "no such result file")
        if job.state != "done":
            raise ApiError(409, f"this job is {job.state}: no result yet")
        path = job.dir / RESULT / name
        if not path.is_file():
            raise ApiError(404, "the result file is missing")
        return FileResponse(path, media_type=files[name], filename=name if download else None,
                            content_disposition_type="attachment" if download else "inline")

    return app


def _probe(path: Path):

    return probe_video(path)
