"""The app's command line, its pipeline settings (built by ``infer.py``'s own parser) and the tiny-model fallback.

``python -m webapp`` takes the app's options (``--host``, ``--port``, ``--work_dir``, ``--max_upload_mb``,
``--workers``, ``--expire_hours``) and hands everything else (``--config FILE`` in order, ``--detect.upsample 1``,
``--generator PATH``...) to ``anonymizer.cli.build_parser`` / ``settings_from_args`` (as infer.py), so the page runs
on exactly the settings ``infer.py`` would use with the same options.

Without ``--config`` or a model path, and without the official weights at their default places, the app runs on the
tiny random-init models of ``make demo`` (``outputs/tiny/``; built here when missing, as
``python -m scripts.make_tiny_models`` does; the demo's trained tiny encoder when ``make demo`` has made it, else an
untrained one) with ``configs/infer/tiny.yaml``, and the page shows a banner saying so.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from anonymizer import cli as infer
from anonymizer.settings import InferSettings
from keepr.errors import KeeprError, MissingWeightsError

ROOT = Path(__file__).resolve().parents[1]

MODEL_OPTIONS = ("--generator", "--encoder", "--cosegmentation", "--cosegmentation_config")
TINY_CONFIG = ROOT / "configs" / "infer" / "tiny.yaml"
DEMO_BANNER = ("Demo mode: no official weights were found, so this server runs on the tiny random-init models of "
               "`make demo`. Their \"virtual faces\" are textures and the person stays recognisable: this shows the "
               "machinery, not anonymization. Get the weights (README) and start it with "
               "--config configs/infer/default.yaml.")


@dataclass
class AppConfig:
    """Everything the app needs; ``settings`` are the pipeline's (``InferSettings``)."""

    settings: InferSettings
    work_dir: Path
    host: str = "127.0.0.1"
    port: int = 8000
    max_upload_mb: float = 500.0
    workers: int = 1
    expire_hours: float = 24.0
    banner: str | None = None  # shown on the page (demo mode)
    device: str = "cpu"

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def expire_seconds(self) -> float:
        return self.expire_hours * 3600.0


def infer_settings(configs: list[str], extra: list[str]) -> InferSettings:
    """The settings ``infer.py --config C1 --config C2 ... EXTRA`` would run with (``progress`` off)."""

    args = [a for c in configs for a in ("--config", str(c))]
    cfg = infer.build_parser().parse_args([*args, "--video", "-", "--out", "-", "--progress", "false", *extra])
    return infer.settings_from_args(cfg)


def ensure_tiny_models(out: Path = ROOT / "outputs") -> dict[str, Path]:
    """The demo's tiny models under ``out`` (built when missing, as ``make demo``'s first step does)."""
    # heavy (torch): only when the app falls back to the tiny models
    from models.encoder import save_encoder  # heavy (torch): only in ensure_tiny_models()
    from models.stylegan2 import load_generator  # heavy (torch): only in ensure_tiny_models()
    from models.tiny import COSEG_FILE, GENERATOR_FILE, make_tiny_models, tiny_encoder  # heavy (torch)

    tiny = out / "tiny"
    gen, seg = tiny / GENERATOR_FILE, tiny / COSEG_FILE
    if not (gen.is_file() and seg.is_file()):
        make_tiny_models(tiny, seed=0, encoder=False)  # as `make demo` does
    enc = out / "encoder_tiny_demo" / "encoder.safetensors"  # trained by `make demo`
    if not enc.is_file():
        enc = out / "webapp" / "encoder_tiny_untrained.safetensors"
        if not enc.is_file():
            enc.parent.mkdir(parents=True, exist_ok=True)
            save_encoder(tiny_encoder(load_generator(gen), seed=0), enc, gen)
    return {"generator": gen, "encoder": enc, "cosegmentation": seg}


def resolve_settings(configs: list[str], extra: list[str], tiny_dir: Path = ROOT / "outputs"
                     ) -> tuple[InferSettings, str | None]:
    """(settings, banner): the settings of ``configs`` + ``extra``; when none names a model and the default weights
    are missing, the tiny demo models instead, with the banner text."""
    from anonymizer.pipeline import check_model_files  # heavy (torch): only in resolve_settings()

    settings = infer_settings(configs, extra)
    explicit = bool(configs) or any(a.split("=")[0] in MODEL_OPTIONS for a in extra)
    try:
        check_model_files(settings.models)
        return settings, None
    except MissingWeightsError:
        if explicit:
            raise
    paths = ensure_tiny_models(tiny_dir)
    models = [a for k, p in paths.items() for a in (f"--{k}", str(p))]
    models += ["--cosegmentation_config", str(ROOT / "configs" / "cosegmentation" / "tiny.yaml")]
    return infer_settings([str(TINY_CONFIG)], [*models, *extra]), DEMO_BANNER


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m webapp", description=(__doc__ or "").split("\n\n")[0],
                                epilog="Any other option (--detect.upsample 1, --generator PATH, ...) is infer.py's "
                                       "and sets the pipeline the same way.")
    p.add_argument("--config", action="append", default=[], help="infer YAML config (configs/infer/*.yaml); "
                   "may be repeated, applied in order over configs/infer/default.yaml")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: localhost only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--work_dir", type=Path, default=ROOT / "outputs" / "webapp" / "jobs",
                   help="root of the jobs' directories")
    p.add_argument("--max_upload_mb", type=float, default=500.0, help="largest upload accepted (MB)")
    p.add_argument("--workers", type=int, default=1, help="jobs worked on at the same time")
    p.add_argument("--expire_hours", type=float, default=24.0,
                   help="a job and its files are removed this long after its last change")
    return p


def parse_args(argv: list[str] | None = None) -> AppConfig:
    parser = build_arg_parser()
    args, extra = parser.parse_known_args(argv)
    if args.max_upload_mb <= 0 or args.workers < 1 or args.expire_hours <= 0:
        parser.error("--max_upload_mb and --expire_hours must be positive, --workers at least 1")
    try:
        settings, banner = resolve_settings(args.config, extra)
    except KeeprError as exc:
        raise SystemExit(f"error: {' '.join(str(exc).split())}") from None
    return AppConfig(settings=settings, work_dir=args.work_dir, host=args.host, port=args.port,
                     max_upload_mb=args.max_upload_mb, workers=args.workers, expire_hours=args.expire_hours,
                     banner=banner, device=settings.swap.device)
