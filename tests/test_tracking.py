"""Tracking against a real MLflow sqlite store."""

from omegaconf import OmegaConf

from pipeline.tracking import Tracker, flatten
from tests.conftest import mlflow_client


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


def test_flatten_is_dotted_and_lists_are_json():
    flat = flatten(OmegaConf.create({"a": {"b": 1, "c": [1, 2]}, "d": None}))
    assert flat == {"a.b": "1", "a.c": "[1, 2]", "d": "None"}
