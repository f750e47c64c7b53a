"""Tracking against a real MLflow sqlite store and a real MLflow server."""

import json
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline.server import Server, free_port
from pipeline.tracking import JournalTracker, Tracker, flatten, git_state, installed_packages, open_tracker
from tests import services
from tests.conftest import FAST, compose_with, mlflow_client, pipeline, refused, replace, started


def test_long_params_are_truncated_not_fatal_and_metrics_batched(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = OmegaConf.create({"tracking": {"uri": "sqlite:///mlflow.db", "experiment": "t", "artifact_location": "mlruns"}})
    tracker = Tracker(cfg)
    long_value = "x" * 10_000
    with tracker.run("parent", {}) as parent_id:
        with tracker.run("child", {"stage": "s"}) as child_id:
            tracker.log_params({f"p{i}": i for i in range(250)} | {"long": long_value})
            for step in range(1500):
                tracker.log_metrics({"m": step * 0.5}, step=step)
    client = mlflow_client(tmp_path)
    child = client.get_run(child_id)
    assert child.data.tags["mlflow.parentRunId"] == parent_id
    assert len(child.data.params) == 251
    assert child.data.params["long"].endswith("[truncated]") and len(child.data.params["long"]) <= 6000
    history = client.get_metric_history(child_id, "m")
    assert len(history) == 1500 and sorted(m.step for m in history)[-1] == 1499


def test_the_journal_alone_keeps_each_run_nested_with_its_status(tmp_path):
    cfg = compose_with("tracking=journal", f"paths.artifacts={tmp_path}")
    tracker = open_tracker(cfg)
    assert isinstance(tracker, JournalTracker)
    with tracker.run("parent", {"command": "c"}) as parent_id:
        tracker.log_params({"train.lr": 0.1})
        with pytest.raises(RuntimeError), tracker.run("train", {"stage": "train"}) as child_id:
            tracker.log_metrics({"train/loss": 2.5}, step=3)
            raise RuntimeError("a stage failed")
    child = [json.loads(line) for line in (tmp_path / "metrics-journal" / f"{child_id}.jsonl").read_text().splitlines()]
    assert child[0] == {"run": "train", "parent": parent_id, "tags": {"stage": "train"}}
    assert {"key": "train/loss", "value": 2.5, "step": 3} | {"timestamp": child[1]["timestamp"]} == child[1]
    assert child[-1] == {"status": "FAILED", "error": "RuntimeError: a stage failed"}
    parent = [json.loads(line) for line in (tmp_path / "metrics-journal" / f"{parent_id}.jsonl").read_text().splitlines()]
    assert parent[1] == {"params": {"train.lr": "0.1"}} and parent[-1] == {"status": "FINISHED"}


def test_report_runs_need_an_mlflow_store(tmp_path):
    message = refused(tmp_path, "tracking=journal", "report.runs=[0123abc]", "stage=report")
    assert "report.runs=['0123abc'] reads MLflow runs, and tracking=journal has no MLflow store" in message


def test_git_state_without_git_is_unknown_not_fatal(monkeypatch):
    assert len(git_state()["git.commit"]) == 40
    monkeypatch.setenv("PATH", "")  # as in the container images, which have no git
    assert git_state() == {"git.commit": "unknown", "git.dirty": "unknown"}


def test_the_environment_lists_every_installed_package_at_its_version():
    from importlib import metadata

    listed = installed_packages().splitlines()
    assert listed == sorted(listed) and f"torch=={metadata.version('torch')}" in listed
    # What importlib.metadata's own parser reads from the same files.
    assert listed == sorted(f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions() if d.metadata["Name"])


def test_flatten_is_dotted_and_lists_are_json():
    flat = flatten(OmegaConf.create({"a": {"b": 1, "c": [1, 2]}, "d": None}))
    assert flat == {"a.b": "1", "a.c": "[1, 2]", "d": "None"}


def mlflow_server_at(root: Path) -> Server:
    """A real MLflow tracking server on loopback, on a sqlite store, artifacts served through it."""
    return services.mlflow_server(root, f"sqlite:///{root}/backend.db")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    with mlflow_server_at(root) as server:
        yield server.url, root / "store"


@pytest.mark.slow
def test_pipeline_logs_through_a_real_tracking_server(tmp_path, mlflow_server):
    from mlflow.tracking import MlflowClient

    url, store = mlflow_server
    pipeline(tmp_path, "stage=prepare", "tracking=server", f"tracking.uri={url}", "tracking.experiment=team")
    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("team")
    (prepare,) = client.search_runs([experiment.experiment_id], "attributes.run_name = 'prepare'")
    assert prepare.data.tags["data_hash"] and prepare.info.status == "FINISHED"
    assert prepare.info.artifact_uri.startswith("mlflow-artifacts:")  # uploaded through the server
    assert {a.path for a in client.list_artifacts(prepare.info.run_id)} >= {"manifest.json", "tokenizer"}
    assert list(store.rglob("manifest.json")) and not (tmp_path / "mlruns").exists()


@pytest.mark.slow
def test_unreachable_server_fails_before_any_work(tmp_path):
    result = pipeline(tmp_path, "tracking=server", f"tracking.uri=http://127.0.0.1:{free_port()}", check=False)
    assert result.returncode != 0
    assert "is not reachable" in result.stderr and "tracking=local" in result.stderr
    assert not (tmp_path / "artifacts").exists()


@pytest.mark.slow
def test_metrics_survive_a_server_that_drops_mid_run(tmp_path):
    from mlflow.tracking import MlflowClient

    log = tmp_path / "pipeline.log"
    # Fail fast instead of MLflow's default minutes of retries, which ride out brief outages.
    env = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    with mlflow_server_at(tmp_path / "server") as server:
        process = started(tmp_path, "stage=[prepare,train]", "train.precision=fp32",
                          *replace(FAST, "train.max_steps=100000", "train.log_every=1", "train.checkpoint_every=5"),
                          "tracking=server", f"tracking.uri={server.url}", log=log, env=env)
        client = MlflowClient(server.url)
        received, deadline = [], time.monotonic() + 300
        while not received and process.is_alive() and time.monotonic() < deadline:
            time.sleep(1)
            found = client.search_runs(["0", *[e.experiment_id for e in client.search_experiments()]],
                                       "attributes.run_name = 'train'")
            received = found and client.get_metric_history(found[0].info.run_id, "train/loss")
        assert received, log.read_text()[-3000:]
        run_id = found[0].info.run_id
    # The server is gone; training goes on until its next delivery fails.
    try:
        process.join(timeout=300)
    finally:
        process.kill()
    output = log.read_text()
    journal = tmp_path / "artifacts" / "metrics-journal" / f"{run_id}.jsonl"
    assert process.exitcode != 0
    assert f"its metrics computed so far are kept in {journal}" in output
    kept = [json.loads(line) for line in journal.read_text().splitlines()]
    kept_steps = {m["step"] for m in kept if m["key"] == "train/loss"}
    # Everything the server got, and the steps computed after it went away.
    assert {m.step for m in received} < kept_steps
    assert kept_steps == set(range(1, max(kept_steps) + 1))
