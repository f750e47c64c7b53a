"""The stage contract: what every module in stages/ declares and provides.

A stage module declares `STAGE = Stage(...)` (its name, the settings its output depends on, the
stages whose outputs it reads, whether it may run in several processes) and provides
`check(cfg)`, `run(cfg, tracker)` and `record(cfg, tracker)`. The runner, the output addresses
(pipeline.artifacts) and the DVC graph (pipeline.graph) read these declarations and nothing else.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from omegaconf import DictConfig

_DECLARED: dict[str, "Stage"] = {}


class PipelineError(RuntimeError):
    """A failure the message explains in full (a gate broken, a server that died, a rank that
    failed, a store that stopped answering): the user needs the message, not a traceback."""


# What `python -m pipeline` reports as one line: bad settings and inputs (ValueError), unusable
# paths (OSError), numbers a precision cannot hold (FloatingPointError) and the explained
# failures. Anything else is a bug, and keeps its traceback.
USER_ERRORS = (ValueError, OSError, FloatingPointError, PipelineError)


def last_words(text: str) -> str:
    """What in a process's output says why it stopped, for a one-line error (the whole output stays
    in its log): a Python traceback's exception line; else the first line naming an error (a C++
    tool's root cause) and the last (what it then did), or the last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "Traceback (most recent call last)" in text:
        raised = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Exit|Interrupt)\b", line)]
        if raised:
            return raised[-1]
    named = [line for line in lines if re.search(r"error|exception|fatal|failed|abort", line, re.IGNORECASE)]
    if not named:
        return lines[-1] if lines else "(no output)"
    return named[0] if len(named) == 1 else f"{named[0]} … {named[-1]}"


@dataclass(frozen=True)
class Stage:
    name: str
    # Config keys (a section such as "train", or a dotted leaf) whose values the output depends on.
    settings: tuple[str, ...]
    # Stages whose outputs this one reads: their addresses are part of its own.
    reads: tuple[str, ...] = ()
    # Keys under `settings` that change how the stage runs but not what it writes.
    ignores: tuple[str, ...] = ()
    # What one output covers: "data" (one per data set), "run" (one per model, precision and
    # seed) or "sweep" (one for every precision of otherwise identical settings).
    scope: str = "run"
    # Whether `accelerate=...` may run it in several processes.
    launchable: bool = False
    # Whether a finished output at its address is used again instead of running the stage. A
    # stage that reads outputs beyond its own address (the report reads every precision) is not.
    reusable: bool = True
    # Stages whose outputs it also reads at the fp32 reference settings (fp32 at
    # evaluate.reference_seed), where those exist: whether they do is part of its address.
    references: tuple[str, ...] = ()
    # Settings that some values of the declared ones bring in: a function of the config to more
    # keys (train.qat=w4a16 trains for the quantize stage's group size).
    more_settings: Callable[[DictConfig], tuple[str, ...]] | None = field(default=None, hash=False, compare=False)
    # Names in its output that other stages read ({role: name}): declared by the writer, so that no
    # reader spells them.
    names: dict[str, str] = field(default_factory=dict, hash=False, compare=False)

    def keys(self, cfg: DictConfig) -> tuple[str, ...]:
        """Every setting its output depends on, for these settings."""
        return (*self.settings, *(self.more_settings(cfg) if self.more_settings else ()))

    def __post_init__(self):
        # Declaring is registering: a stage's address needs the declarations of what it reads.
        _DECLARED[self.name] = self


def declared(name: str) -> Stage:
    """The declaration of stage `name`, loading stages/<name>.py if nothing has yet: an address
    needs the declarations of every stage it reads, whichever stage module was imported first."""
    if name not in _DECLARED:
        importlib.import_module(f"stages.{name}")
    return _DECLARED[name]


class Tracking(Protocol):
    """What a stage may ask of its tracker (pipeline.tracking: Tracker, JournalTracker, or NoTracker off rank 0)."""

    run_id: str | None
    pipeline_run_id: str | None

    def log_params(self, params: dict[str, str]) -> None: ...
    def set_tags(self, tags: dict[str, str], run_id: str | None = None) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def log_artifacts(self, path: Path, artifact_path: str | None = None) -> None: ...
    def flush(self) -> None: ...


class StageModule(Protocol):
    STAGE: Stage

    def check(self, cfg: DictConfig) -> list[str] | str | None:
        """Refuses bad settings, missing files or unsuitable hardware before any stage works, in one
        line; returns what it verified, for the pre-flight report (stage=check)."""

    def run(self, cfg: DictConfig, tracker: Tracking) -> None:
        """Writes the output at its address (atomically), then records it."""

    def record(self, cfg: DictConfig, tracker: Tracking) -> None:
        """Logs what the finished output at its address holds: after run, and when it is reused."""
