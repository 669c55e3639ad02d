"""Running the command line in tests: through ``main`` in this process (what
``python -m graphprune.cli`` calls, without an interpreter start each time), or in a subprocess."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from collections.abc import Iterator

from graphprune.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_process(*args: str) -> subprocess.CompletedProcess:
    """``python -m graphprune.cli ARGS`` in a fresh interpreter."""
    env = {**os.environ, "TQDM_DISABLE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "graphprune.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


def run(*args: str) -> subprocess.CompletedProcess:
    """``graphprune ARGS`` run by ``main`` in this process (the same code, without an interpreter
    start each time), with its exit code and what it printed."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), _no_progress_bars():
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse's own usage errors
            code = exc.code
    return subprocess.CompletedProcess(["graphprune", *args], code, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    before = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TQDM_DISABLE"]
        else:
            os.environ["TQDM_DISABLE"] = before
