"""KEEP:R web app: upload a video, pick the people and one of 9 virtual faces each, get the anonymized video.

    python -m webapp [--config configs/infer/default.yaml] [--host 127.0.0.1] [--port 8000] [--work_dir DIR]
        [--max_upload_mb 500] [--workers 1] [--expire_hours 24] [--INFER_OPTION VALUE ...]

A FastAPI app (:mod:`webapp.app`) serving one static page (``webapp/static/``, no build step, nothing fetched from
outside the server) and a JSON API; the work runs as jobs in background workers (:mod:`webapp.jobs`) on the same
library calls as ``infer.py`` (:mod:`anonymizer.pipeline`). Without the official weights it runs on the demo's tiny
random models and says so on the page (:mod:`webapp.config`).
"""
