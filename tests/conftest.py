"""Shared fixtures: the real pipeline run as a subprocess in a throwaway working directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import register

register()  # compose_with builds the config as `python -m pipeline` does, on the typed schemas

# Two test processes share 2 cores (make test): a library that starts a thread per core in each
# would have them take turns. Set before the fork server and every subprocess start.
os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
# Every config group and its options, as conf/ has them.
GROUPS = {g.name: sorted(p.stem for p in g.glob("*.yaml")) for g in CONF.iterdir() if g.is_dir()}
# The whole chain, small but real (conf/profile/smoke.yaml), at fp32 so that it runs at one speed
# on every CPU; FAST trains for only a handful of steps.
SMALL_CHAIN = ["profile=smoke", "train.precision=fp32"]
# The tests train the tiny model from random initialisation unless they name a model: the toy, a
# fine-tune of the pretrained base (model=base), has tests of its own (tests/test_base.py), as has
# the offline default, SmolLM2-135M-Instruct (tests/test_smollm2.py).
# Two of its four layers: still several blocks for every per-layer path (AWQ, QAT, K-quants, the
# converter's tensor map), and a third less time a training step (a smoke chain: 15% less).
TEST_MODEL = ["model=tiny", "model.arch.num_hidden_layers=2"]
FAST = ["profile=smoke", "train.max_steps=8"]


# The longest test modules first: the two test processes of `make test` (each takes whole modules,
# whose tests share module fixtures) then finish close together.
LONGEST_FIRST = ("test_smollm2.py", "test_report.py", "test_base.py", "test_dvc.py", "test_team.py", "test_families.py", "test_train.py",
                 "test_tracking.py", "test_distributed.py", "test_gpu_bundle.py", "test_qat.py", "test_vllm.py",
                 "test_export.py", "test_reuse.py", "test_serve.py", "test_config.py", "test_chat.py",
                 "test_quantize_evaluate.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))


# The data of the tests of a checkpoint of their own (model=hf), unless they name one: plain text,
# which every tokenizer takes (the default, chat data, needs a chat template the family
# checkpoints of tests/families.py mostly lack); the toy models pick it themselves.
TEST_DATA = "data=pydoc"


def with_test_model(overrides) -> list[str]:
    """The overrides with TEST_MODEL first, unless they name a model or a composed config of their
    own; a checkpoint's (model=hf) get TEST_DATA unless they name data."""
    overrides = list(overrides)
    own = any(o.startswith(("model=", "--config-name")) for o in overrides)
    if "model=hf" in overrides and not any(o.startswith("data=") for o in overrides):
        overrides.insert(overrides.index("model=hf") + 1, TEST_DATA)
    return overrides if own else [*TEST_MODEL, *overrides]


def compose_with(*overrides):
    """The composed config, as `python -m pipeline` with these overrides would see it in a test."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", overrides=with_test_model(overrides))


def refused(tmp_path: Path, *overrides: str) -> str:
    """The error `python -m pipeline` refuses these settings with, found in-process by the same
    pre-flight checks (pipeline.preflight.preflight); nothing may have been written."""
    from pipeline.compare import checked_runs
    from pipeline.contract import USER_ERRORS
    from pipeline.preflight import preflight

    cfg = compose_with(*overrides, f"paths.artifacts={tmp_path}/artifacts")
    with pytest.raises(USER_ERRORS) as error:
        for run in checked_runs(cfg):  # a comparison's runs in turn, fp32 first, as it checks them
            preflight(run)
    assert not (tmp_path / "artifacts").exists()
    return str(error.value)


def replace(overrides: list[str], *new: str) -> list[str]:
    """`overrides` with the keys of `new` set to new values (Hydra refuses a key given twice)."""
    keys = {o.split("=", 1)[0] for o in new}
    return [o for o in overrides if o.split("=", 1)[0] not in keys] + list(new)


# The libraries `python -m pipeline` spends its first ~10 s importing. Our own code is not among
# them: a test may run a changed copy of it (root=). Nor is GuideLLM: its import starts a logging
# thread, which a forked child would not have.
PRELOAD = ["torch", "transformers", "transformers.models.llama.modeling_llama", "mlflow",
           "mlflow.store.tracking.sqlalchemy_store", "llmcompressor.modifiers.transform.awq.mappings", "peft",
           "accelerate", "datasets", "hydra", "omegaconf", "llama_cpp", "gguf", "matplotlib.pyplot"]
_forks = None


def forks():
    """A fork server that has imported PRELOAD: each pipeline run is a fresh process forked from it,
    started in a fraction of a second. The tests run the pipeline some sixty times."""
    global _forks
    if _forks is None:
        import multiprocessing

        # As stages/quantize.py sets it before it imports llm-compressor, which reads it on import.
        os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "WARNING")
        _forks = multiprocessing.get_context("forkserver")
        _forks.set_forkserver_preload(PRELOAD)
    return _forks


_empty_store = None


def empty_store() -> Path:
    """An MLflow sqlite store with its tables made by MLflow's migrations (about 2 s a store), made
    once per test process."""
    global _empty_store
    if _empty_store is None:
        import tempfile

        from mlflow.tracking import MlflowClient

        _empty_store = Path(tempfile.mkdtemp()) / "mlflow.db"
        MlflowClient(f"sqlite:///{_empty_store}").search_experiments()
    return _empty_store


def pipeline(cwd: Path, *overrides: str, check: bool = True, multirun: bool = False, root: Path = ROOT,
             fork: bool = True, terminal: str | None = None) -> subprocess.CompletedProcess:
    """`python -m pipeline` with these overrides in `cwd`, running the code under `root`: forked from
    the fork server, or with fork=False a new interpreter, for what only a whole start-up shows. A
    run expected to succeed on the default local store starts from a copy of `empty_store()` where
    `cwd` has none; one expected to fail does not, so that it can be seen to write nothing. With
    `terminal` (a terminal device's path), what the run writes goes there instead of into the result."""
    import tempfile

    args = [*(["-m"] if multirun else []), *with_test_model(overrides)]
    if check and not any(o.startswith("tracking") for o in overrides) and not (Path(cwd) / "mlflow.db").exists():
        shutil.copy(empty_store(), Path(cwd) / "mlflow.db")
    env = {**os.environ, "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", "pipeline", *args]
    if fork:
        with tempfile.TemporaryDirectory() as logs:
            out, err = (Path(terminal),) * 2 if terminal else (Path(logs) / "stdout", Path(logs) / "stderr")
            child = _forked(cwd, args, env, out, err)
            child.join()
            written = ("", "") if terminal else (out.read_text(), err.read_text())
            result = subprocess.CompletedProcess(cmd, child.exitcode, *written)
    else:
        result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def started(cwd: Path, *overrides: str, log: Path, env: dict | None = None):
    """`python -m pipeline` with these overrides in `cwd`, forked as `pipeline` runs it but left
    running, for a test that acts while it runs or interrupts it: the process (multiprocessing's).
    What it writes goes to `log`; `env` adds to the environment."""
    return _forked(cwd, with_test_model(overrides), {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, log, log)


def _forked(cwd: Path, args: list[str], env: dict, out: Path, err: Path):
    import runpy

    child = forks().Process(target=runpy.run_path, args=(str(Path(__file__).with_name("forked.py")),),
                            kwargs={"init_globals": {"ARGV": args, "CWD": str(cwd), "ENV": env,
                                                     "STDOUT": str(out), "STDERR": str(err)}})
    child.start()
    return child


@pytest.fixture
def run_pipeline(tmp_path):
    def run(*overrides, **kwargs):
        return pipeline(tmp_path, *overrides, **kwargs)

    return run


@pytest.fixture(scope="session")
def chain(tmp_path_factory, worker_id):
    """One small but complete run of every stage, shared by the tests that read its outputs, and
    by every test process when pytest-xdist runs several (the first to need it builds it).
    Nothing writes into it: a test that runs stages on these outputs takes `own_chain`."""
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp()
    shared = shared if worker_id == "master" else shared.parent
    cwd = shared / "chain"
    with FileLock(shared / "chain.lock"):
        if not (cwd / "done").exists():
            shutil.rmtree(cwd, ignore_errors=True)
            cwd.mkdir()
            result = pipeline(cwd, "stage=all", *SMALL_CHAIN)
            # What the terminal showed, for the test of the console (tests/test_console.py).
            (cwd / "console.txt").write_text(result.stdout + result.stderr)
            (cwd / "done").touch()
    return cwd


@pytest.fixture
def own_chain(chain, tmp_path):
    """A copy of the chain's outputs (not of its tracking store: a fresh one is made beside them)."""
    shutil.copytree(chain / "artifacts", tmp_path / "artifacts", symlinks=True)
    return tmp_path


@pytest.fixture
def opt_checkpoint(tmp_path):
    """A checkpoint of an architecture outside what quantize (no AWQ mapping) and export (not in
    llama.cpp's converter) support."""
    from transformers import OPTConfig, OPTForCausalLM

    from stages.prepare import train_tokenizer

    path = tmp_path / "opt"
    OPTForCausalLM(OPTConfig(hidden_size=128, num_hidden_layers=1, num_attention_heads=2, ffn_dim=256,
                             word_embed_proj_dim=128, vocab_size=300)).save_pretrained(path)
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


