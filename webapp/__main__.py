"""python -m webapp [--config ...] [--host 127.0.0.1] [--port 8000] [--work_dir DIR] [--max_upload_mb 500] ..."""
from __future__ import annotations

import logging
import sys

from keepr.errors import KeeprError
from webapp.config import parse_args


def main(argv: list[str] | None = None) -> None:
    import uvicorn  # heavy (uvicorn): only in main()

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = parse_args(argv)
    log = logging.getLogger("webapp")
    if config.banner:
        log.warning("%s", config.banner)
    log.info("loading the models (%s)...", config.settings.models.generator)
    from webapp.app import create_app  # heavy (torch): only in main()

    try:
        app = create_app(config)
    except KeeprError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        raise SystemExit(1) from None
    log.info("KEEP:R web app on http://%s:%d/ (jobs in %s)", config.host, config.port, config.work_dir)
    uvicorn.run(app, host=config.host, port=config.port, log_level="info")


if __name__ == "__main__":
    main()
