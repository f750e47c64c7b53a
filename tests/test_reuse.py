"""Finished stages are reused: a second run with nothing changed runs only the report, and a
change of settings or of a stage's code runs that stage and the stages after it again."""

import shutil
from pathlib import Path

import pytest

from tests.conftest import ROOT, SMALL_CHAIN, pipeline, replace, runs

pytestmark = pytest.mark.slow
CHAIN = SMALL_CHAIN


def stage_runs(cwd, parent):
    """{stage: reused?} of the child runs of one pipeline run."""
    return {r.data.tags["stage"]: r.data.tags["reused"] == "true" for r in runs(cwd)
            if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}


def last_parent(cwd):
    return [r for r in runs(cwd) if "mlflow.parentRunId" not in r.data.tags][-1]


@pytest.fixture(scope="module")
def project(chain, tmp_path_factory):
    """A copy of the project (its code is changed below) holding the shared chain's finished outputs."""
    project = tmp_path_factory.mktemp("project")
    for name in ("pipeline", "stages", "conf"):
        shutil.copytree(ROOT / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(chain / "artifacts", project / "artifacts", symlinks=True)
    return project


def test_second_run_reuses_every_finished_stage(project):
    before = {p: p.stat().st_mtime_ns for p in (project / "artifacts").glob("*/*/summary.json")}
    result = pipeline(project, "stage=all", *CHAIN, root=project)
    reused = stage_runs(project, last_parent(project))
    assert reused == {"prepare": True, "train": True, "quantize": True, "export": True, "evaluate": True,
                      "serve": True, "report": False}
    assert "[6/7] serve: reusing artifacts/serve/" in result.stderr
    assert {p: p.stat().st_mtime_ns for p in before} == before  # nothing rewritten
    # The stored results are logged again to the reused runs.
    evaluate = [r for r in runs(project, "evaluate")][-1]
    assert evaluate.data.tags["reused"] == "true" and evaluate.data.metrics["eval/trained.q8_0/kl"] > 0


# The stage these tests make run again: the last before the report, and among the quickest.
AGAIN = ["serve", "report"]


def test_a_settings_change_reruns_that_stage_and_those_after_it(project):
    pipeline(project, "stage=all", *replace(CHAIN, "serve.bootstrap=150"), root=project)
    reused = stage_runs(project, last_parent(project))
    assert [s for s, again in reused.items() if not again] == AGAIN


def test_rerun_forces_a_stage(project):
    pipeline(project, "stage=all", *CHAIN, "rerun=[serve]", root=project)
    reused = stage_runs(project, last_parent(project))
    assert [s for s, again in reused.items() if not again] == AGAIN


def test_a_code_change_reruns_that_stage_and_those_after_it(project):
    """Only serve runs this file (and the report reads serve): a new address for its output, the
    old one kept. That addresses carry every upstream stage's code is checked in test_graph."""
    serve = project / "stages" / "serve.py"
    serve.write_text(serve.read_text() + "\n# a change to the serve stage's code\n")
    pipeline(project, "stage=all", *CHAIN, root=project)
    reused = stage_runs(project, last_parent(project))
    assert [s for s, again in reused.items() if not again] == AGAIN
    outputs = [r.data.tags["output"] for r in runs(project, "serve")]
    assert outputs[-1] != outputs[0] and all(Path(o).is_dir() for o in (outputs[0], outputs[-1]))


def test_a_stage_that_reads_an_output_made_anew_runs_again(project):
    """An export made again (its output gone) is read again by the evaluation and the serving
    benchmark, whose outputs still exist: reused, they would hold what they measured of the old
    files, or nothing of them."""
    (export,) = (project / "artifacts" / "export").iterdir()
    shutil.rmtree(export)
    pipeline(project, "stage=all", *CHAIN, root=project)
    reused = stage_runs(project, last_parent(project))
    assert [s for s, again in reused.items() if not again] == ["export", "evaluate", "serve", "report"]
    assert export.is_dir()


def test_a_bad_setting_prints_one_line_without_a_traceback(tmp_path):
    # What a user's shell shows, from a whole interpreter start.
    result = pipeline(tmp_path, "train.max_steps=0", check=False, fork=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["error: train.max_steps=0 must be at least 1."]
    (tmp_path / "file").write_text("")
    result = pipeline(tmp_path, f"paths.artifacts={tmp_path}/file/artifacts", check=False, fork=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"error: paths.artifacts='{tmp_path}/file/artifacts' is not a writable directory "
                                     f"({tmp_path}/file is not a directory). Point paths.artifacts at a directory this "
                                     "user can write.")
