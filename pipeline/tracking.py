"""MLflow tracking: one parent run per pipeline invocation, one child run per stage.

Calls go through MlflowClient with explicit run ids (no global "active run"), metrics are
buffered and sent in batches because every call to the store costs ~30 ms.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pipeline.contract import PipelineError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
VERSIONED_PACKAGES = ("torch", "transformers", "accelerate", "tokenizers", "mlflow", "hydra-core")
METRIC_BATCH = 1000  # MLflow's per-call limit on metrics
PARAM_BATCH = 100  # and on params
# tracking.uri that keeps every run in its journal, without an MLflow store (conf/tracking/journal.yaml).
JOURNAL = "journal"


def now_ms() -> int:
    """A time as MLflow keeps it: milliseconds since the epoch."""
    return int(time.time() * 1000)


def flatten(cfg: DictConfig) -> dict[str, str]:
    """Dotted-key view of a resolved config; lists become JSON strings."""
    out = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            out[prefix[:-1]] = json.dumps(node) if isinstance(node, list) else str(node)

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


def git_state() -> dict[str, str]:
    def git(*args):
        try:
            result = subprocess.run(["git", "-C", str(PROJECT_ROOT), *args], capture_output=True, text=True)
        except OSError:  # no git at all, as in the container images
            return None
        return result.stdout.strip() if result.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"git.commit": "unknown", "git.dirty": "unknown"}
    return {"git.commit": commit, "git.dirty": str(bool(git("status", "--porcelain")))}


def versions() -> dict[str, str]:
    tags = {"version.python": platform.python_version()}
    for package in VERSIONED_PACKAGES:
        try:
            tags[f"version.{package}"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return tags


def installed_packages() -> str:
    """Every installed distribution, name==version, read from the head of its metadata file: its
    `metadata` property runs the email parser over the whole file, long descriptions included
    (0.15-0.45 s a run for some 220 packages, against 0.015 s)."""
    found = []
    for dist in metadata.distributions():
        head = (dist.read_text("METADATA") or dist.read_text("PKG-INFO") or "").split("\n\n", 1)[0]
        fields = {}
        for line in head.splitlines():
            key, colon, value = line.partition(": ")
            if colon and key in ("Name", "Version"):
                fields.setdefault(key, value.strip())
        if fields.get("Name"):
            found.append(f"{fields['Name']}=={fields.get('Version')}")
    return "\n".join(sorted(found)) + "\n"


def require_server(uri: str) -> None:
    """A tracking server must answer before any work starts, not after training is done."""
    import httpx

    try:
        httpx.get(f"{uri.rstrip('/')}/health", timeout=10).raise_for_status()
    except httpx.HTTPError as error:
        raise ConnectionError(f"The MLflow tracking server at tracking.uri={uri} is not reachable ({error}). "
                              "Start it, fix the address, or track locally with tracking=local.") from None


class TrackingError(PipelineError):
    """The tracking store stopped answering; the message says where the metrics are kept."""


class DamagedStore(PipelineError):
    """The MLflow sqlite store is damaged; the message names the file and what to do."""


def sqlite_file(uri: str) -> Path | None:
    """The file of a sqlite:/// tracking uri (sqlite:///mlflow.db is relative to the working
    directory, sqlite:////abs/mlflow.db absolute); None for any other store."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def check_store(uri: str) -> str:
    """An existing sqlite store must pass SQLite's `PRAGMA quick_check` before a run writes to it:
    SQLite writes to a damaged file without a word, and the runs logged there may be lost with it.
    Opened read-only, so the check itself writes nothing. Returns what it verified."""
    import sqlite3

    path = sqlite_file(uri)
    if path is None or not path.is_file():
        return f"no existing sqlite store to check (tracking.uri={uri})"
    started = time.perf_counter()
    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)) as db:
            found = [str(row[0]) for row in db.execute("PRAGMA quick_check")]
    except sqlite3.OperationalError as error:
        # Locked past the timeout, unreadable, or a hot journal a read-only connection may not roll
        # back: no verdict on its pages. MLflow opens it next and reports what it finds.
        return f"{path}: SQLite's quick_check could not run ({error}); left to MLflow"
    except sqlite3.DatabaseError as error:  # the header itself: "file is not a database", "malformed"
        found = [str(error)]
    if found != ["ok"]:
        words = "; ".join(" ".join(line.split()) for line in found[:3]) + ("; ..." if len(found) > 3 else "")
        raise DamagedStore(
            f"The MLflow store {path.resolve()} (tracking.uri={uri}) is damaged: SQLite's quick_check says "
            f"\"{words}\". Nothing was written to it. Move it aside (mv {path} {path}.damaged), and the next "
            "run starts a new store in its place (sqlite3's .recover may save its runs); MLflow's artifacts "
            "(./mlruns) and the pipeline's outputs (paths.artifacts) are untouched.")
    return f"{path} passes SQLite's quick_check ({(time.perf_counter() - started) * 1000:.0f} ms)"


def param_value(value) -> str:
    """A param as MLflow takes it: MLflow rejects longer values, so they are cut (the full config is
    kept as the resolved_config.yaml artifact)."""
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    value = str(value)
    return value if len(value) <= MAX_PARAM_VAL_LENGTH else value[: MAX_PARAM_VAL_LENGTH - 15] + "...[truncated]"


class OpenRuns:
    """The runs a tracker has open, outermost (the pipeline run) first, and where each one's
    journal is: <paths.artifacts>/metrics-journal/<run id>.jsonl."""

    _runs: list[str]

    def __init__(self, cfg: DictConfig, attach: str | None):
        self.journal_dir = Path(OmegaConf.select(cfg, "paths.artifacts", default="artifacts")).resolve() / "metrics-journal"
        self._runs = [attach] if attach else []

    @property
    def run_id(self) -> str:
        return self._runs[-1]

    @property
    def pipeline_run_id(self) -> str:
        return self._runs[0]

    def journal(self, run_id: str) -> Path:
        return self.journal_dir / f"{run_id}.jsonl"


class Tracker(OpenRuns):
    """Logs to one MLflow store. With `attach`, logs into that already-open run (a launched
    training process writing into the pipeline process's run).

    Every metric is also appended to a local journal, <paths.artifacts>/metrics-journal/<run id>.jsonl,
    before it is sent; the journal is removed when its run ends with everything delivered. If the
    store stops answering, nothing more is sent and the error names the journal."""

    def __init__(self, cfg: DictConfig, attach: str | None = None):
        from filelock import FileLock
        from mlflow.tracking import MlflowClient

        self.uri = uri = str(cfg.tracking.uri)
        if uri.startswith(("http://", "https://")) and attach is None:
            require_server(uri)
        # Parallel sweep jobs on a fresh sqlite store would race to create its tables and the
        # experiment; the first creates them while the others wait.
        lock = FileLock(uri.removeprefix("sqlite:///") + ".lock") if uri.startswith("sqlite:///") else contextlib.nullcontext()
        with lock:
            if attach is None:  # a launched process writes into a run its pipeline process opened on a checked store
                check_store(uri)
            self.client = MlflowClient(tracking_uri=uri)
            if attach is None:
                self.experiment_id = self._experiment(cfg.tracking.experiment, cfg.tracking.artifact_location)
        super().__init__(cfg, attach)
        self.lost: Exception | None = None  # the error that cut this process off from the store
        self._metrics = []

    def _call(self, method: str, *args, **kwargs):
        """One request to the store. After a failure no more are made: the run cannot be completed
        there, and retrying would only stall the error. (MLflow itself retries brief outages.)"""
        if self.lost is not None:
            return None
        try:
            return getattr(self.client, method)(*args, **kwargs)
        except Exception as error:
            self.lost = error
            where = f"; its metrics computed so far are kept in {self.journal(self.run_id)}" if self._runs else ""
            raise TrackingError(f"Logging to the MLflow store at tracking.uri={self.uri} failed ({error}). "
                                f"Run {self._runs[-1] if self._runs else '(none)'} is incomplete there{where}; "
                                "stage outputs are under paths.artifacts as usual.") from error

    def _experiment(self, name: str, artifact_location: str | None) -> str:
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        from mlflow.exceptions import MlflowException

        location = Path(artifact_location).resolve().as_uri() if artifact_location else None
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except MlflowException as error:
            # Parallel jobs of a sweep on a server create it at once: the first one does, the others take it.
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return self.client.get_experiment_by_name(name).experiment_id

    @contextlib.contextmanager
    def run(self, name: str, tags: dict[str, str]):
        """A run (nested under the current one, if any) that ends FAILED on any exception."""
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

        all_tags = {MLFLOW_RUN_NAME: name, **tags}
        if self._runs:
            all_tags[MLFLOW_PARENT_RUN_ID] = self.run_id
        run_id = self._call("create_run", self.experiment_id, tags=all_tags, run_name=name).info.run_id
        self._runs.append(run_id)
        try:
            yield run_id
        except BaseException as error:
            # The error being raised is the one to report, not a second one from the store.
            with contextlib.suppress(TrackingError):
                self._call("set_tag", run_id, "error", f"{type(error).__name__}: {error}"[:5000])
                self._end(run_id, "FAILED")
            raise
        else:
            self._end(run_id, "FINISHED")
        finally:
            self._runs.pop()

    def _end(self, run_id: str, status: str) -> None:
        self.flush()
        self._call("set_terminated", run_id, status)
        if self.lost is None:
            self.journal(run_id).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.journal_dir.rmdir()  # only once empty: another run may still be writing

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(key, param_value(value)) for key, value in params.items()]
        for i in range(0, len(items), PARAM_BATCH):
            self._call("log_batch", self.run_id, params=items[i : i + PARAM_BATCH])

    def set_tags(self, tags: dict[str, str], run_id: str | None = None) -> None:
        from mlflow.entities import RunTag

        self._call("log_batch", run_id or self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = now_ms()
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        self.journal_dir.mkdir(parents=True, exist_ok=True)
        with open(self.journal(self.run_id), "a") as journal:
            journal.writelines(json.dumps({"key": m.key, "value": m.value, "step": m.step, "timestamp": m.timestamp}) + "\n"
                               for m in batch)
        self._metrics += batch
        if len(self._metrics) >= METRIC_BATCH:
            self.flush()

    def flush(self) -> None:
        while self._metrics:
            batch, self._metrics = self._metrics[:METRIC_BATCH], self._metrics[METRIC_BATCH:]
            self._call("log_batch", self.run_id, metrics=batch)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._call("log_artifact", self.run_id, str(path), artifact_path)

    def log_artifacts(self, path: Path, artifact_path: str | None = None) -> None:
        self._call("log_artifacts", self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._call("log_text", self.run_id, text, artifact_file)


class JournalTracker(OpenRuns):
    """tracking.uri=journal, for a machine without an MLflow store (a lent GPU machine, an air-gapped
    one): each run's tags, params and metrics go to its journal, <paths.artifacts>/metrics-journal/
    <run id>.jsonl, one JSON object a line, which is kept. Artifacts stay where the stages wrote them;
    the journal names them. `python -m pipeline.journal import` puts journals into an MLflow store
    (pipeline.journal reads them).

    The lines: first {"run": name, "parent": parent's run id or null, "tags", "experiment",
    "start_time"}, then any of {"params"}, {"tags"}, {"key", "value", "step", "timestamp"} (a metric),
    {"artifact": absolute path of a file or folder, "artifact_path"}, {"text", "artifact_file"}, and
    last {"status": FINISHED or FAILED, "error" (FAILED only), "end_time"}. Times in ms since the epoch."""

    def __init__(self, cfg: DictConfig, attach: str | None = None):
        super().__init__(cfg, attach)
        # The experiment the runs would have gone to, where an import puts them.
        self.experiment = OmegaConf.select(cfg, "tracking.experiment", default=None)

    def _write(self, record: dict, run_id: str | None = None) -> None:
        self.journal_dir.mkdir(parents=True, exist_ok=True)
        with open(self.journal(run_id or self.run_id), "a") as journal:
            journal.write(json.dumps(record) + "\n")

    @contextlib.contextmanager
    def run(self, name: str, tags: dict[str, str]):
        import uuid

        run_id = uuid.uuid4().hex
        self._write({"run": name, "parent": self._runs[-1] if self._runs else None, "tags": tags,
                     "experiment": self.experiment, "start_time": now_ms()}, run_id)
        self._runs.append(run_id)
        try:
            yield run_id
        except BaseException as error:
            self._write({"status": "FAILED", "error": f"{type(error).__name__}: {error}"[:5000], "end_time": now_ms()})
            raise
        else:
            self._write({"status": "FINISHED", "end_time": now_ms()})
        finally:
            self._runs.pop()

    def log_params(self, params: dict[str, str]) -> None:
        self._write({"params": {k: str(v) for k, v in params.items()}})

    def set_tags(self, tags: dict[str, str], run_id: str | None = None) -> None:
        self._write({"tags": {k: str(v) for k, v in tags.items()}}, run_id)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        now = now_ms()
        for key, value in metrics.items():
            self._write({"key": key, "value": float(value), "step": step or 0, "timestamp": now})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._write({"artifact": str(Path(path).resolve()), "artifact_path": artifact_path})

    def log_artifacts(self, path: Path, artifact_path: str | None = None) -> None:
        self.log_artifact(path, artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._write({"text": text, "artifact_file": artifact_file})

    def flush(self) -> None:
        pass


def open_tracker(cfg: DictConfig, attach: str | None = None) -> Tracker | JournalTracker:
    """The tracker tracking.uri names: an MLflow store, or the journal alone (tracking=journal)."""
    return JournalTracker(cfg, attach) if str(cfg.tracking.uri) == JOURNAL else Tracker(cfg, attach)


class NoTracker:
    """The tracker of a process that must not log (every rank but 0): the Tracker's methods, each
    doing nothing. Spelt out, so that a misspelt call fails on every rank, not only on rank 0."""

    run_id = pipeline_run_id = None

    @contextlib.contextmanager
    def run(self, name: str, tags: dict[str, str]):
        yield None

    def log_params(self, params: dict[str, str]) -> None:
        pass

    def set_tags(self, tags: dict[str, str], run_id: str | None = None) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def log_artifacts(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def flush(self) -> None:
        pass


def quiet_libraries() -> None:
    """The pipeline's own log lines are enough: Accelerate logs every checkpoint file and httpx
    every request at INFO, and transformers draws a progress bar per file it loads or saves."""
    import logging

    from transformers.utils import logging as transformers_logging

    logging.getLogger("accelerate").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # mlflow announces each migration of a new store's tables.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    # ... and prints two links to the terminal each time a run on a server ends, a dozen a chain:
    # the runner's last line says where the runs are.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    transformers_logging.disable_progress_bar()


def run_tags(hardware_tags: dict[str, str]) -> dict[str, str]:
    return {**git_state(), **versions(), **hardware_tags, "command": " ".join(["python -m pipeline", *sys.argv[1:]])}

