"""The GPU benchmark's carry: its bundle stays the project's versions and within the carry limit,
and its script runs end to end in an environment of only what the GPU machine has (make
gpu-rehearsal), so that the one short run on a lent GPU cannot fail on an import."""

import json
import subprocess
from importlib import metadata
from pathlib import Path

import pytest

from pipeline.hardware import PRECISION_TABLE, detect, resolve_precision
from pipeline.formats import QAT
from tests.conftest import ROOT

GPU = ROOT / "benchmarks" / "gpu"
CARRY_LIMIT = 64 * 2**20


def pins(name: str) -> dict[str, str]:
    lines = [line.split("#")[0].strip() for line in (GPU / name).read_text().splitlines()]
    return dict(line.split("==") for line in lines if "==" in line)


def test_the_bundle_carries_the_versions_installed_here():
    assert {package: metadata.version(package) for package in pins("bundle.txt")} == pins("bundle.txt")


@pytest.mark.slow
def test_the_rehearsal_runs_the_script_on_only_what_the_gpu_machine_has(tmp_path):
    out = tmp_path / "rehearsal"
    made = subprocess.run(["make", "-s", "gpu-rehearsal", f"GPU_REHEARSAL={out}"], cwd=ROOT, capture_output=True,
                          text=True)
    assert made.returncode == 0, made.stdout[-3000:] + made.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    env = results["environment"]
    # It ran in the stand-in: the machine's torch, the carried hydra and torchao, and no MLflow.
    assert env["torch"].split("+")[0] == pins("machine.txt")["torch"] and env["hydra-core"] == pins("bundle.txt")["hydra-core"]
    assert env["torchao"] == pins("bundle.txt")["torchao"] and env["mlflow"] is None
    assert results["auto"]["choice"] == resolve_precision("auto", detect())[0]
    for precision in ("fp32", "bf16", "fp16"):
        run = results["train"][precision]
        assert run["status"] == "ok" and run["compute_dtype"] == PRECISION_TABLE[precision].compute_dtype, run
        low, high = run["tokens_per_s_ci"]
        assert low <= run["tokens_per_s"] <= high and run["timed_steps"] > 1
    assert results["train"]["fp8"]["status"] == "refused" and "fp8 needs a GPU" in results["train"]["fp8"]["reason"]
    for arm in QAT:
        assert results["qat"][arm]["ci"][0] <= results["qat"][arm]["ratio"] <= results["qat"][arm]["ci"][1]
    assert results["quantize"]["status"] == "skipped" and "llmcompressor" in results["quantize"]["reason"]
    assert "| fp8 | refused:" in (out / "results.md").read_text()
    # Every run is kept in the journal, with its metrics.
    journals = list((out / "artifacts" / "metrics-journal").glob("*.jsonl"))
    records = [json.loads(line) for journal in journals for line in journal.read_text().splitlines()]
    assert any(r.get("key") == "train/loss" for r in records) and any(r.get("status") == "FINISHED" for r in records)

    bundle = sum(p.stat().st_size for p in (GPU / "bundle").glob("*.whl"))
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    tree = sum((ROOT / f).stat().st_size for f in tracked.split("\0") if f and (ROOT / f).is_file())
    assert bundle + tree <= CARRY_LIMIT, (bundle, tree)
