"""MLflow tracking: one parent run per pipeline invocation, one child run per stage.

Calls go through MlflowClient with explicit run ids (no global "active run"), metrics are
buffered and sent in batches because every call to the store costs ~30 ms.
"""

from __future__ import annotations

import contextlib
import json
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parent.parent
VERSIONED_PACKAGES = ("torch", "transformers", "accelerate", "tokenizers", "mlflow", "hydra-core")
METRIC_BATCH = 1000  # MLflow's per-call limit on metrics
PARAM_BATCH = 100  # and on params


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
        result = subprocess.run(["git", "-C", str(PROJECT_ROOT), *args], capture_output=True, text=True)
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
    names = sorted(f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions() if d.metadata["Name"])
    return "\n".join(names) + "\n"


def require_server(uri: str) -> None:
    """A tracking server must answer before any work starts, not after training is done."""
    import httpx

    try:
        httpx.get(f"{uri.rstrip('/')}/health", timeout=10).raise_for_status()
    except httpx.HTTPError as error:
        raise ConnectionError(f"The MLflow tracking server at tracking.uri={uri} is not reachable ({error}). "
                              "Start it, fix the address, or track locally with tracking=local.") from None


class Tracker:
    def __init__(self, cfg: DictConfig):
        from filelock import FileLock
        from mlflow.tracking import MlflowClient

        uri = str(cfg.tracking.uri)
        if uri.startswith(("http://", "https://")):
            require_server(uri)
        # Parallel sweep jobs on a fresh sqlite store would race to create its tables and the
        # experiment; the first creates them while the others wait.
        lock = FileLock(uri.removeprefix("sqlite:///") + ".lock") if uri.startswith("sqlite:///") else contextlib.nullcontext()
        with lock:
            self.client = MlflowClient(tracking_uri=uri)
            self.experiment_id = self._experiment(cfg.tracking.experiment, cfg.tracking.artifact_location)
        self._runs: list[str] = []  # open runs, outermost (the pipeline run) first
        self._metrics = []

    @property
    def run_id(self) -> str:
        return self._runs[-1]

    @property
    def pipeline_run_id(self) -> str:
        return self._runs[0]

    def _experiment(self, name: str, artifact_location: str | None) -> str:
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        location = Path(artifact_location).resolve().as_uri() if artifact_location else None
        return self.client.create_experiment(name, artifact_location=location)

    @contextlib.contextmanager
    def run(self, name: str, tags: dict[str, str]):
        """A run (nested under the current one, if any) that ends FAILED on any exception."""
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

        all_tags = {MLFLOW_RUN_NAME: name, **tags}
        if self._runs:
            all_tags[MLFLOW_PARENT_RUN_ID] = self.run_id
        run_id = self.client.create_run(self.experiment_id, tags=all_tags, run_name=name).info.run_id
        self._runs.append(run_id)
        status = "FAILED"
        try:
            yield run_id
            status = "FINISHED"
        except BaseException as error:
            self.client.set_tag(run_id, "error", f"{type(error).__name__}: {error}"[:5000])
            raise
        finally:
            self.flush()
            self.client.set_terminated(run_id, status)
            self._runs.pop()

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        items = []
        for key, value in params.items():
            value = str(value)
            if len(value) > MAX_PARAM_VAL_LENGTH:
                # MLflow rejects longer values; the full config is kept as the resolved_config.yaml artifact.
                value = value[: MAX_PARAM_VAL_LENGTH - 15] + "...[truncated]"
            items.append(Param(key, value))
        for i in range(0, len(items), PARAM_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + PARAM_BATCH])

    def set_tags(self, tags: dict[str, str], run_id: str | None = None) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id or self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._metrics += [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        if len(self._metrics) >= METRIC_BATCH:
            self.flush()

    def flush(self) -> None:
        while self._metrics:
            batch, self._metrics = self._metrics[:METRIC_BATCH], self._metrics[METRIC_BATCH:]
            self.client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)


def run_tags(hardware_tags: dict[str, str]) -> dict[str, str]:
    return {**git_state(), **versions(), **hardware_tags, "command": " ".join(["python -m pipeline", *sys.argv[1:]])}
