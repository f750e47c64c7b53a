"""dvc.yaml: real `dvc repro` in a throwaway git repository holding the project."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT, TEST_MODEL

# One precision (a matrix of one) plus the noise-floor and QAT chains: every kind of stage, in the fewest runs.
# Each stage is a process of its own; tracked in the journal, it starts without MLflow's imports and
# store (seconds apiece): the tracking tests cover MLflow.
SMALL = [*TEST_MODEL, "report.precisions=[fp32]", "train.max_steps=6", "train.warmup_steps=1", "train.eval_every=3",
         "train.eval_batches=1", "quantize.calibration.samples=4", "quantize.calibration.seq_len=64", "quantize.awq.n_grid=3",
         "evaluate.max_sequences=8", "evaluate.bootstrap=100", "evaluate.prompts=2", "serve.llamacpp.files=[trained.q4_k_m]",
         "quantize.methods=[awq]", "export.sources=[trained]", "export.types=[q4_k_m,q4_0]", "export.imatrix=[]",
         "serve.load.levels=[1]", "serve.load.requests=4", "evaluate.second_opinion.enabled=false",
         "tracking=journal"]


def run(repo, *args, stdout_only=False):
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    result = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout if stdout_only else result.stdout + result.stderr


def ran(output):
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("dvc-repo")
    for name in ("pipeline", "stages", "conf", ".dvc"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__", "cache", "tmp"))
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, repo / name)
    params = run(repo, sys.executable, "-m", "pipeline", "--cfg", "job", "--resolve", *SMALL)
    (repo / "params.yaml").write_text(params)
    run(repo, "git", "init", "-q")
    run(repo, "git", "add", "-A")
    run(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "project")
    return repo


@pytest.mark.slow
def test_repro_runs_everything_then_nothing_then_only_what_changed(repo):
    first = ran(run(repo, "dvc", "repro"))
    per_precision = {"train", "quantize", "export", "evaluate", "serve"}
    noise = {"train-noise", "quantize-noise", "export-noise", "evaluate-noise"}
    qat = {name.replace("-noise", "-qat") for name in noise}
    assert first == {"prepare", "report"} | noise | qat | {f"{s}@fp32" for s in per_precision}
    report = repo / "dvc" / "report" / "tiny-sweep-seed0"
    assert (report / "report.html").exists()
    # The noise floor is a second fp32 run (seed 1), measured against the seed-0 model.
    data = json.loads((report / "report.json").read_text())
    assert data["noise_seed"] == 1 and data["comparisons"]["noise"]["trained"]["ratio"] != 1
    assert (repo / "dvc" / "evaluate" / "tiny-fp32-seed1-vs-seed0" / "summary.json").exists()
    # The QAT arm: an fp32 run trained for Q4_0, set against PTQ of the fp32 run at Q4_0.
    assert data["qat"]["fp32"]["q4_0"]["artifact"] == "trained.q4_0" and data["qat_train"]["fp32"]["q4_0"]["qat"] == "q4_0"

    second = run(repo, "dvc", "repro")
    assert ran(second) == set()

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["serve"]["load"]["requests"] = 3
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    assert ran(run(repo, "dvc", "repro")) == {"serve@fp32", "report"}

    # A setting only training reads (and that addresses its output) puts every training out of date.
    params["train"]["max_consecutive_skips"] = 7
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    assert set(json.loads(run(repo, "dvc", "status", "--json", stdout_only=True))) == {"train@fp32", "train-noise",
                                                                                        "train-qat"}


@pytest.mark.slow
def test_metrics_and_plots_render(repo):
    metrics = run(repo, "dvc", "metrics", "show", "--json")
    assert "trained.q4_k_m" in metrics and "kl_vs_fp32" in metrics
    out = run(repo, "dvc", "plots", "show", "-o", str(repo / "plots"))
    assert "index.html" in out and (repo / "plots" / "index.html").exists()


def test_committed_params_match_the_config_tree():
    """params.yaml is what dvc.yaml's stages read: it must not drift from conf/."""
    composed = subprocess.run([sys.executable, "-m", "pipeline", "--cfg", "job", "--resolve"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout
    assert yaml.safe_load(composed) == yaml.safe_load((ROOT / "params.yaml").read_text()), "run `make params`"
