"""Benchmarks (not tests), run as modules from the repository root: ``python -m bench.NAME``."""
from __future__ import annotations


def failure_line(stderr: str) -> str:
    """The one line that says why a child process failed: its ``error: ...`` line, else the last line of its
    traceback (the exception), else a note that it printed nothing."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("error: "):
            return ln[len("error: "):]
    return lines[-1] if lines else "no error message"
