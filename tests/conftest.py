"""Shared fixtures: the real pipeline run as a subprocess in a throwaway working directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
# Every config group and its options, as conf/ has them.
GROUPS = {g.name: sorted(p.stem for p in g.glob("*.yaml")) for g in CONF.iterdir() if g.is_dir()}
# Small but real: the tiny model for a handful of steps.
FAST = [
    "train.max_steps=8",
    "train.warmup_steps=1",
    "train.log_every=2",
    "train.eval_every=4",
    "train.checkpoint_every=4",
    "train.eval_batches=1",
    "tracking.log_model=false",
]

# The whole chain, small: fp32 training, quick AWQ, a shorter evaluation, two GGUF files served.
SMALL_CHAIN = ["train.precision=fp32", *FAST, "train.max_steps=30", "train.lr=5e-3",
               "quantize.calibration.samples=4", "quantize.calibration.seq_len=64", "quantize.awq.n_grid=4",
               "evaluate.max_sequences=16", "evaluate.bootstrap=200", "evaluate.prompts=4",
               "serve.llamacpp.files=[trained.q8_0,trained.q4_k_m]", "serve.load.levels=[1,2]", "serve.load.requests=6"]


def compose_with(*overrides):
    """The composed config, as `python -m pipeline` with these overrides would see it."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def replace(overrides: list[str], *new: str) -> list[str]:
    """`overrides` with the keys of `new` set to new values (Hydra refuses a key given twice)."""
    keys = {o.split("=", 1)[0] for o in new}
    return [o for o in overrides if o.split("=", 1)[0] not in keys] + list(new)


def pipeline(cwd: Path, *overrides: str, check: bool = True, multirun: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pipeline", *(["-m"] if multirun else []), *overrides]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


@pytest.fixture
def run_pipeline(tmp_path):
    def run(*overrides, **kwargs):
        return pipeline(tmp_path, *overrides, **kwargs)

    return run


@pytest.fixture(scope="session")
def chain(tmp_path_factory):
    """One small but complete run of every stage, shared by the tests that read its outputs."""
    cwd = tmp_path_factory.mktemp("chain")
    pipeline(cwd, "stage=all", *SMALL_CHAIN)
    return cwd


@pytest.fixture
def gpt2_checkpoint(tmp_path):
    """A checkpoint of an architecture outside what quantize and export support."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from stages.prepare import train_tokenizer

    path = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=300)).save_pretrained(path)
    train_tokenizer(["some text"] * 10, 300).save_pretrained(path)
    return path


def mlflow_client(cwd: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{cwd}/mlflow.db")


def runs(cwd: Path, name: str | None = None):
    """All runs of the pipeline's experiment (optionally only those with this run name), oldest first."""
    client = mlflow_client(cwd)
    experiment = client.get_experiment_by_name("precision-pipeline")
    found = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    return [r for r in found if name is None or r.info.run_name == name]


def only_dir(parent: Path) -> Path:
    dirs = [p for p in parent.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(dirs) == 1, dirs
    return dirs[0]


def chain_output(chain: Path, stage: str) -> Path:
    """The directory the chain fixture itself wrote for `stage`: the oldest, since some tests run
    the stage again with other settings in the same place."""
    return min((p for p in (chain / "artifacts" / stage).iterdir() if not p.name.startswith(".")),
               key=lambda p: p.stat().st_mtime)
