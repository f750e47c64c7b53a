"""Tracking against a real MLflow sqlite store and a real MLflow server."""

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline.journal import collect
from pipeline.server import Server, free_port
from pipeline.tracking import DamagedStore, JournalTracker, Tracker, check_store, flatten, git_state, installed_packages, open_tracker
from tests import services
from tests.conftest import FAST, ROOT, compose_with, mlflow_client, pipeline, refused, replace, started


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
    started, ended = child[0].pop("start_time"), child[-1].pop("end_time")
    assert child[0] == {"run": "train", "parent": parent_id, "tags": {"stage": "train"}, "experiment": "precision-pipeline"}
    assert {"key": "train/loss", "value": 2.5, "step": 3} | {"timestamp": child[1]["timestamp"]} == child[1]
    assert child[-1] == {"status": "FAILED", "error": "RuntimeError: a stage failed"}
    assert started <= child[1]["timestamp"] <= ended
    parent = [json.loads(line) for line in (tmp_path / "metrics-journal" / f"{parent_id}.jsonl").read_text().splitlines()]
    assert parent[1] == {"params": {"train.lr": "0.1"}} and parent[-1]["status"] == "FINISHED"


def import_journal(path: Path, store: Path, *more: str) -> subprocess.CompletedProcess:
    """`python -m pipeline.journal import path` into the sqlite store `store`, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "pipeline.journal", "import", str(path), "--tracking-uri",
                           f"sqlite:///{store}", *more], cwd=store.parent, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.slow
def test_journal_runs_import_into_an_mlflow_store_once(tmp_path):
    """A parent run with two stage runs, one failed, written by the journal tracker as tracking=journal
    writes them, imported into a fresh store: structure, params, metric histories, statuses, times and
    the files still there; a second import adds nothing."""
    from mlflow.tracking import MlflowClient

    cfg = compose_with("tracking=journal", f"paths.artifacts={tmp_path / 'artifacts'}")
    tracker = open_tracker(cfg)
    summary = tmp_path / "summary.json"
    summary.write_text("{}")
    with tracker.run("tiny-fp32", {"command": "c"}) as parent_id:
        tracker.log_params({"train.lr": 0.1, "long": "x" * 10_000})
        tracker.log_text("train:\n  lr: 0.1\n", "resolved_config.yaml")
        with tracker.run("prepare", {"stage": "prepare"}) as prepare_id:
            for step in range(1, 1501):  # two batches of metrics
                tracker.log_metrics({"train/loss": 3.0 - step / 1000}, step=step)
            tracker.log_artifact(summary)
            tracker.log_artifact(tmp_path / "gone.json", "gone")
            tracker.set_tags({"data_hash": "abc"})
        with pytest.raises(RuntimeError), tracker.run("train", {"stage": "train"}) as train_id:
            tracker.log_metrics({"eval/loss": 2.5, "eval/perplexity": 12.2}, step=0)
            tracker.log_metrics({"eval/loss": 2.25}, step=4)
            raise RuntimeError("a stage failed")
    journals = tmp_path / "artifacts" / "metrics-journal"
    store = tmp_path / "mlflow.db"

    first = import_journal(journals, store)
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert len(lines) == 4 and lines[-1] == f"3 run(s) imported, 0 already there, into sqlite:///{store}", lines
    assert lines[0].startswith(f"imported {parent_id}.jsonl (tiny-fp32) as run ") and "at the top" in lines[0]
    assert "1500 metric values, 1 artifacts, FINISHED; 1 named file(s) no longer exist" in first.stdout
    client = MlflowClient(f"sqlite:///{store}")
    found = {r.data.tags["precision_pipeline.journal_run_id"]: r for r in
             client.search_runs([client.get_experiment_by_name("precision-pipeline").experiment_id])}
    assert found.keys() == {parent_id, prepare_id, train_id}
    parent, prepare, train = found[parent_id], found[prepare_id], found[train_id]
    assert parent.info.run_name == "tiny-fp32" and "mlflow.parentRunId" not in parent.data.tags
    assert prepare.data.tags["mlflow.parentRunId"] == train.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert parent.data.params["train.lr"] == "0.1" and parent.data.params["long"].endswith("[truncated]")
    assert parent.data.tags["command"] == "c" and prepare.data.tags["data_hash"] == "abc"
    history = client.get_metric_history(prepare.info.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(s, 3.0 - s / 1000) for s in range(1, 1501)]
    kept = [json.loads(line) for line in (journals / f"{prepare_id}.jsonl").read_text().splitlines()]
    assert {m.timestamp for m in history} == {r["timestamp"] for r in kept if "key" in r}
    assert sorted((m.step, m.value) for m in client.get_metric_history(train.info.run_id, "eval/loss")) == [(0, 2.5), (4, 2.25)]
    assert (parent.info.status, prepare.info.status, train.info.status) == ("FINISHED", "FINISHED", "FAILED")
    assert train.data.tags["error"] == "RuntimeError: a stage failed"
    assert prepare.info.start_time == kept[0]["start_time"] and prepare.info.end_time == kept[-1]["end_time"]
    assert parent.info.start_time <= prepare.info.start_time <= train.info.end_time <= parent.info.end_time
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {"resolved_config.yaml"}
    assert {a.path for a in client.list_artifacts(prepare.info.run_id)} == {"summary.json"}

    again = import_journal(journals, store)
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines() == [
        f"skipped {parent_id}.jsonl (tiny-fp32): already imported as run {parent.info.run_id}",
        f"skipped {prepare_id}.jsonl (prepare): already imported as run {prepare.info.run_id}",
        f"skipped {train_id}.jsonl (train): already imported as run {train.info.run_id}",
        f"0 run(s) imported, 3 already there, into sqlite:///{store}"]
    assert len(client.search_runs([parent.info.experiment_id])) == 3
    assert len(client.get_metric_history(prepare.info.run_id, "train/loss")) == 1500
    # One journal file brings its parent's, from beside it, so that it keeps its place.
    runs, _ = collect(journals / f"{train_id}.jsonl")
    assert [(r.run_id, r.status) for r in runs] == [(parent_id, "FINISHED"), (train_id, "FAILED")]


def test_journal_import_refuses_what_is_not_a_journal_in_one_line(tmp_path):
    store = tmp_path / "mlflow.db"
    not_journal = tmp_path / "notes.jsonl"
    not_journal.write_text('{"run": "x"}\nnot json\n')
    for path, words in [(tmp_path / "missing", f"error: {tmp_path / 'missing'} does not exist"),
                        (not_journal, f"error: {not_journal} is not a metrics journal: line 2 is not a JSON object."),
                        (tmp_path, f"error: {not_journal} is not a metrics journal: line 2 is not a JSON object.")]:
        result = import_journal(path, store)
        assert result.returncode == 1 and result.stderr.startswith(words), result.stderr
        assert len(result.stderr.splitlines()) == 1 and not store.exists()


def test_a_journal_from_before_runs_kept_their_times_takes_its_metrics_times(tmp_path):
    journal = tmp_path / "0a1b.jsonl"
    journal.write_text('{"run": "train", "parent": null, "tags": {"stage": "train"}}\n'
                       '{"key": "train/loss", "value": 2.5, "step": 1, "timestamp": 1000}\n'
                       '{"key": "train/loss", "value": 2.0, "step": 2, "timestamp": 2000}\n{"status": "FINISHED"}\n')
    (run,), _ = collect(journal)
    assert (run.name, run.start_time, run.end_time, run.status, run.experiment) == ("train", 1000, 2000, "FINISHED", None)


def mlflow_store(path: Path, metrics: int = 50) -> Path:
    """A small real MLflow sqlite store: one run with some metrics."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{path}")
    run = client.create_run(client.create_experiment("t"))
    for i in range(0, metrics, 1000):
        client.log_batch(run.info.run_id, metrics=[Metric("m", float(s), 0, s) for s in range(i, min(i + 1000, metrics))])
    client.set_terminated(run.info.run_id)
    return path


def damaged(store: Path) -> Path:
    """A copy of `store` with garbage over some pages in its middle, as SQLite's quick_check sees it."""
    copy = store.with_name("damaged.db")
    data = bytearray(store.read_bytes())
    middle = len(data) // 2 // 4096 * 4096
    data[middle : middle + 4 * 4096] = bytes(range(256)) * 64
    copy.write_bytes(bytes(data))
    with contextlib.closing(sqlite3.connect(copy)) as db:
        try:
            found = [row[0] for row in db.execute("PRAGMA quick_check")]
        except sqlite3.DatabaseError as error:
            found = [str(error)]
    assert found != ["ok"] and "malformed" in " ".join(found), found
    return copy


def test_a_damaged_store_is_refused_before_a_run_writes_to_it(tmp_path):
    store = mlflow_store(tmp_path / "mlflow.db", metrics=3000)
    assert f"{store} passes SQLite's quick_check" in check_store(f"sqlite:///{store}")
    broken = damaged(store)
    before = broken.read_bytes()
    with pytest.raises(DamagedStore) as refusal:
        check_store(f"sqlite:///{broken}")
    message = str(refusal.value)
    assert f"The MLflow store {broken} (tracking.uri=sqlite:///{broken}) is damaged: SQLite's quick_check says" in message
    assert "malformed" in message and f"mv {broken} {broken}.damaged" in message and "\n" not in message
    # The run's own opening refuses it, before MLflow touches it.
    cfg = OmegaConf.create({"tracking": {"uri": f"sqlite:///{broken}", "experiment": "t", "artifact_location": None}})
    with pytest.raises(DamagedStore):
        Tracker(cfg)
    assert broken.read_bytes() == before
    # No store yet, or another kind: nothing to check.
    assert "no existing sqlite store" in check_store(f"sqlite:///{tmp_path / 'new.db'}")
    assert "no existing sqlite store" in check_store("http://127.0.0.1:5000")


@pytest.mark.slow
def test_the_pipeline_refuses_a_damaged_store_in_one_line(tmp_path):
    broken = damaged(mlflow_store(tmp_path / "healthy.db"))
    broken.rename(tmp_path / "mlflow.db")
    before = (tmp_path / "mlflow.db").read_bytes()
    result = pipeline(tmp_path, "stage=prepare", check=False)
    assert result.returncode == 1
    # After the pre-flight checks' precision line, before any stage.
    assert result.stderr.splitlines()[-1].startswith(
        f"error: The MLflow store {tmp_path / 'mlflow.db'} (tracking.uri=sqlite:///mlflow.db) is damaged"), result.stderr
    assert (tmp_path / "mlflow.db").read_bytes() == before and not (tmp_path / "artifacts").exists()


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
