"""What a person sees in the terminal: a line as each stage starts and as it ends (its time, where
its output went), the pipeline's own progress bars, its warnings, and at the end where the report is.

Everything else written while a stage runs (the libraries' progress bars and warnings, llama.cpp's
and torch's C++ logging, launched processes) goes to that stage's log file (pipeline.runner.stage_log): the
process's stdout and stderr themselves are pointed at the file, so that what C code and child
processes write lands there too. `verbose=true` leaves them on the terminal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path

# The terminal, kept while the standard streams point at a log file.
_terminal = None


def stream():
    """Where the pipeline's own lines and bars go: the terminal, whatever stdout and stderr point at."""
    return _terminal or sys.stderr


def say(text: str) -> None:
    print(text, file=stream(), flush=True)


class _ToTerminal(logging.Handler):
    """The pipeline's own warnings and errors, on the terminal while a stage's output is captured."""

    def emit(self, record):
        if _terminal is not None:
            say(f"{record.levelname.lower()}: {record.getMessage()}")


def _forward_warnings() -> None:
    for name in ("pipeline", "stages"):
        logger = logging.getLogger(name)
        if not any(isinstance(h, _ToTerminal) for h in logger.handlers):
            handler = _ToTerminal(logging.WARNING)
            logger.addHandler(handler)


@contextlib.contextmanager
def captured(log: Path | None):
    """Points stdout and stderr (the file descriptors, for C code and child processes too) at `log`
    while the block runs, and back at the terminal after it, also when it raises. None: nothing is
    captured (verbose=true)."""
    global _terminal
    if log is None or _terminal is not None:  # verbose, or already inside a capture
        yield
        return
    _forward_warnings()
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "ab") as file:
        os.dup2(file.fileno(), 1)
        os.dup2(file.fileno(), 2)
    _terminal = os.fdopen(os.dup(saved[1]), "w", buffering=1)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        _terminal.close()
        _terminal = None


def shown(path: Path) -> str:
    """A path as short as it can be said: relative to the working directory where it is inside it."""
    with contextlib.suppress(ValueError):
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    return str(path)


@contextlib.contextmanager
def stage_lines(label: str, out: Path, log: Path | None):
    """`label` started, then done with its time and output (or failed, with its log), each one line;
    in between, everything else the block writes goes to `log` (see captured)."""
    started = time.perf_counter()
    say(f"{label} ...")
    try:
        with captured(log):
            yield
    except BaseException:
        where = f"; its log: {shown(log)}" if log is not None else ""
        say(f"{label} failed after {time.perf_counter() - started:.1f} s{where}")
        raise
    say(f"{label} done in {time.perf_counter() - started:.1f} s -> {shown(out)}")


def bar(total: int, initial: int = 0, desc: str = "", shown_here: bool = True):
    """The pipeline's own progress bar, on the terminal; none where that is not a terminal (a plain
    log gets the stage's closing line instead of a bar redrawn in place) or not `shown_here`."""
    from tqdm import tqdm

    out = stream()
    return tqdm(total=total, initial=initial, desc=desc, file=out, leave=False,
                disable=not (shown_here and out.isatty()))
