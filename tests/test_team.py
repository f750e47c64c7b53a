"""Beyond one machine, on real services (tests/services.py): a two-precision sweep of the smoke
chain through hydra/launcher=slurm on a SLURM cluster with accounting, tracked to an MLflow server on
PostgreSQL, set against the same sweep run locally; and the report registering its deployable in
that server's Model Registry. The services start once for the module."""

import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline.artifacts import read_json, sha256_file
from stages.report.register import CANDIDATE
from tests.conftest import pipeline, replace
from tests.services import mlflow_server, postgres, sacct, slurm_cluster

# The smoke chain, one export source, the quantize method and the files the CI gates read, and one
# load level, for two precisions; the report, run once both are done, reads both (the report's CI
# gates apply to it).
SWEEP = ["stage=[prepare,train,quantize,export,evaluate,serve]", "profile=smoke", "train.max_steps=8", "quantize.methods=[awq]",
         "export.sources=[trained]", "export.types=[q8_0,q4_k_m]",
         "export.imatrix=[]", "evaluate.second_opinion.enabled=false", "serve.load.levels=[1]", "train.precision=fp32,bf16"]
# Its fp32 job, run here with Hydra's local launcher: what SLURM's job must match.
LOCAL = replace(SWEEP, "train.precision=fp32")
# A job a CPU and a GB (the config's defaults ask for a GPU node), on the cluster's one partition.
ON_SLURM = ["hydra/launcher=slurm", "hydra.launcher.partition=debug", "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.mem_gb=1", "hydra.launcher.gpus_per_node=null"]
MODEL = "tiny-pydoc"  # report.registered_model: <model>-<data>


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    root = tmp_path_factory.mktemp("team")
    with postgres(root / "postgres") as database, mlflow_server(root / "mlflow", database) as server, \
            slurm_cluster(root / "slurm") as slurm:
        yield SimpleNamespace(url=server.url, database=database, slurm=slurm, root=root)


def on_cluster(env: pytest.MonkeyPatch, team) -> None:
    """The cluster's environment (SLURM_CONF) for the launcher's sbatch and sacct."""
    for key, value in team.slurm.items():
        env.setenv(key, value)


def tracked(team, experiment):
    return ["tracking=server", f"tracking.uri={team.url}", f"tracking.experiment={experiment}"]


@pytest.fixture(scope="module")
def sweeps(team, tmp_path_factory):
    """The sweep through SLURM, and its fp32 job through Hydra's local launcher, each in a folder of
    its own and an experiment of its own on the team server."""
    on_slurm, local = tmp_path_factory.mktemp("on-slurm"), tmp_path_factory.mktemp("local")
    with pytest.MonkeyPatch.context() as env:
        on_cluster(env, team)
        pipeline(on_slurm, *SWEEP, *ON_SLURM, *tracked(team, "slurm"), multirun=True)
    pipeline(local, *LOCAL, *tracked(team, "local"), multirun=True)
    return SimpleNamespace(slurm=on_slurm, local=local)


def outputs(cwd: Path) -> dict[str, dict]:
    """Every stage output by address, with the content hashes it recorded of its files."""
    from pipeline.artifacts import FILES

    return {f"{d.parent.name}/{d.name}": {f: e["sha256"] for f, e in read_json(d / FILES).items()}
            for d in sorted((cwd / "artifacts").glob("*/*")) if (d / FILES).is_file()}


def weights(output: Path) -> dict[str, str]:
    """A hash of every weight file's tensors: the GGUF files' own metadata names the MLflow run
    that made them, so their bytes differ from run to run."""
    import hashlib

    import gguf

    found = {}
    for path in sorted(output.rglob("*.safetensors")):
        found[str(path.relative_to(output))] = sha256_file(path)
    for path in sorted(output.rglob("*.gguf")):
        digest = hashlib.sha256()
        for tensor in gguf.GGUFReader(str(path)).tensors:
            digest.update(tensor.name.encode() + tensor.data.tobytes())
        found[str(path.relative_to(output))] = digest.hexdigest()
    return found


def pipeline_runs(url: str, experiment: str) -> dict[str, dict]:
    """Each pipeline run of the experiment by name: its stage runs' names and the params, metric keys
    and training losses of each."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(url)
    found = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    parents = {r.info.run_id: r for r in found if "mlflow.parentRunId" not in r.data.tags}
    summary = {}
    for parent in parents.values():
        children = [r for r in found if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        summary[parent.info.run_name] = {
            "status": parent.info.status,
            "stages": sorted(c.info.run_name for c in children),
            "params": {k: v for k, v in parent.data.params.items() if not k.startswith("tracking.")},
            "metrics": sorted(k for c in children for k in c.data.metrics),
            "losses": [m.value for c in children if c.info.run_name == "train"
                       for m in client.get_metric_history(c.info.run_id, "train/loss")]}
    return summary


@pytest.mark.slow
def test_a_sweep_on_slurm_runs_as_jobs_and_matches_the_local_launcher(team, sweeps):
    # One task of a SLURM job array a precision: <array job>_<task>.
    submitted = sorted(p.name for p in sweeps.slurm.glob("multirun/*/*/.submitit/*_*") if p.is_dir())
    assert len(submitted) == 2, submitted
    jobs = sacct(team.slurm, *submitted)
    assert {job: (j["state"], j["exit_code"], j["node"]) for job, j in jobs.items()} == \
        {job: ("COMPLETED", "0:0", "localhost") for job in submitted}

    # Every stage of both jobs; the fp32 job's outputs at the local run's addresses, with the same
    # weights, tensor for tensor.
    slurm, local = outputs(sweeps.slurm), outputs(sweeps.local)
    assert len({a.split("/")[0] for a in local}) == 6 and set(local) < set(slurm)
    assert {a.split("/")[0] for a in set(slurm) - set(local)} == {"train", "quantize", "export", "evaluate", "serve"}
    for address in local:
        if address.startswith(("train/", "quantize/", "export/")):
            found = weights(sweeps.slurm / "artifacts" / address)
            assert found and found == weights(sweeps.local / "artifacts" / address), address

    # The same runs in MLflow: stages, settings, metrics and losses.
    on_slurm, here = pipeline_runs(team.url, "slurm"), pipeline_runs(team.url, "local")
    assert set(on_slurm) == {"tiny-fp32", "tiny-bf16"} and on_slurm["tiny-fp32"] == here["tiny-fp32"]
    assert all(r["status"] == "FINISHED" and len(r["stages"]) == 6 and r["losses"] for r in on_slurm.values())


@pytest.mark.slow
def test_a_job_that_fails_on_slurm_fails_the_sweep_with_its_error(team, tmp_path, monkeypatch):
    on_cluster(monkeypatch, team)
    result = pipeline(tmp_path, "stage=prepare", "data.seq_len=64,0", *ON_SLURM, "tracking=journal", multirun=True,
                      check=False)
    assert result.returncode == 1
    # One line, the job's own error with its id, state and log: not submitit's traceback.
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in result.stderr and "HYDRA_FULL_ERROR" not in result.stderr, result.stderr[-3000:]
    (failed, log) = re.fullmatch(r"error: SLURM job (\d+_\d+) failed \(FAILED\): data.seq_len=0 must be at least 2\. "
                                 r"\(its log: (\S+_log\.err)\)", line).groups()
    assert sacct(team.slurm, failed)[failed]["state"] == "FAILED"
    assert "error: data.seq_len=0 must be at least 2." in Path(log).read_text()


@pytest.mark.slow
def test_the_server_s_schema_is_mlflow_s_own_migrations_on_postgresql(team):
    # alembic_version is where MLflow's migrations record the schema revision they brought it to.
    import sqlalchemy

    engine = sqlalchemy.create_engine(team.database)
    with engine.connect() as connection:
        assert connection.execute(sqlalchemy.text("SELECT version()")).scalar().startswith("PostgreSQL")
        assert connection.execute(sqlalchemy.text("SELECT version_num FROM alembic_version")).scalar()
        assert connection.execute(sqlalchemy.text("SELECT count(*) FROM runs")).scalar() >= 0
    engine.dispose()


@pytest.mark.slow
def test_the_report_registers_its_deployable_and_the_alias_follows_the_gates(team, sweeps):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(team.url)
    report = ["report=ci", *replace(SWEEP, "stage=report", "train.precision=fp32"), *tracked(team, "slurm")]
    # A gate no model passes: the version is registered, the alias is not set.
    failing = pipeline(sweeps.slurm, *report, "report.gates=[{artifact: trained.q8_0, metric: kl, max: 0}]", check=False)
    assert failing.returncode != 0 and "quality gate(s) failed" in failing.stderr
    (version,) = client.search_model_versions(f"name = '{MODEL}'")
    assert f"the alias {CANDIDATE} stays where it was: 2 gate(s) failed" in failing.stdout + failing.stderr  # one a precision
    assert not client.get_registered_model(MODEL).aliases

    tags = version.tags
    assert tags["format"] == "trained.q4_k_m" and tags["precision"] in {"fp32", "bf16"}
    assert re.fullmatch(r"\S+ \[\S+, \S+\]", tags["output_tokens_per_s"])  # a figure with its interval
    assert re.fullmatch(r"\S+ \[\S+, \S+\]", tags["perplexity_ratio_to_trained"]) and "kl" in tags
    prepared = next((sweeps.slurm / "artifacts" / "prepare").iterdir())
    assert tags["data_hash"] == read_json(prepared / "manifest.json")["data_hash"]
    training = client.get_run(tags["training_run_id"])
    assert training.info.run_name == "train" and training.data.params["train.precision"] == tags["precision"]
    assert client.get_run(tags["report_run_id"]).info.run_name == "report"
    assert tags["report_run_url"].startswith(f"{team.url}/#/experiments/")

    # Gates passing: the same file, so no second version; the alias moves to it.
    passing = pipeline(sweeps.slurm, *report)
    assert f"alias {CANDIDATE} (models:/{MODEL}@{CANDIDATE})" in passing.stderr  # the pipeline speaks on stderr
    assert "View run" not in passing.stdout  # MLflow's own links to each run, which the last line replaces
    assert [v.version for v in client.search_model_versions(f"name = '{MODEL}'")] == [version.version]
    assert client.get_registered_model(MODEL).aliases == {CANDIDATE: version.version}

    # What a deploy job fetches by the alias is the exported file.
    import mlflow

    mlflow.set_tracking_uri(team.url)
    mlflow.set_registry_uri(team.url)
    fetched = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL}@{CANDIDATE}", dst_path=str(team.root / "deploy")))
    (gguf,) = fetched.rglob("*.gguf")
    assert sha256_file(gguf) == tags["sha256"]
