"""Journal runs into an MLflow store: `python -m pipeline.journal import <journal file or folder>`.

A run tracked with tracking=journal is kept only in <paths.artifacts>/metrics-journal/<run id>.jsonl
(pipeline.tracking.JournalTracker writes it; its docstring lists the lines). This reads such journals
and makes each run again in an MLflow store, through MlflowClient with explicit run ids: its parent,
tags, params, metrics with their steps and timestamps, its text artifacts and the files it names that
still exist, its status and times. Each run is tagged with its journal run id, so importing again
adds nothing.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.contract import USER_ERRORS
from pipeline.tracking import METRIC_BATCH, PARAM_BATCH, PROJECT_ROOT, check_store, param_value, require_server

# The tag that names the journal run an MLflow run was imported from.
JOURNAL_RUN_ID = "precision_pipeline.journal_run_id"
# Where a run whose parent's journal is missing says what its parent was.
JOURNAL_PARENT_RUN_ID = "precision_pipeline.journal_parent_run_id"
# What a metric line holds; a journal of these alone is what the MLflow tracker keeps of a run whose
# store stopped answering (named by its MLflow run id), not a tracking=journal run.
METRIC = {"key", "value", "step", "timestamp"}
# A run whose journal ends without a status stopped without a word (killed, or still running).
NO_STATUS = "KILLED"


class NotAJournal(ValueError):
    """A file that is not a tracking=journal run's journal; the message says what it is instead."""


@dataclass
class JournalRun:
    """One run as its journal has it."""

    path: Path
    name: str
    parent: str | None
    experiment: str | None
    tags: dict[str, str]
    start_time: int | None
    params: dict[str, str] = field(default_factory=dict)
    metrics: list[dict] = field(default_factory=list)
    artifacts: list[tuple[str, str | None]] = field(default_factory=list)
    texts: list[tuple[str, str]] = field(default_factory=list)
    status: str | None = None
    error: str | None = None
    end_time: int | None = None

    @property
    def run_id(self) -> str:
        return self.path.stem


def read(path: Path) -> JournalRun | None:
    """The run of one journal; None for a journal of metrics alone (the MLflow tracker's, see METRIC)."""
    import json

    records = []
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise NotAJournal(f"{path} is not a metrics journal: it is not text.") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            raise NotAJournal(f"{path} is not a metrics journal: line {number} is not a JSON object.")
        records.append((number, record))
    if not records:
        raise NotAJournal(f"{path} is not a metrics journal: it is empty.")
    _, head = records[0]
    if "run" not in head:
        if all(METRIC <= record.keys() for _, record in records):
            return None
        raise NotAJournal(f"{path} is not a metrics journal: its first line names no run ({sorted(head)}).")
    # Journals written before their runs' times were kept: the metrics' times are the nearest.
    stamps = [record["timestamp"] for _, record in records if "key" in record]
    run = JournalRun(path, str(head["run"]), head.get("parent"), head.get("experiment"), dict(head.get("tags") or {}),
                     head.get("start_time") or min(stamps, default=None))
    for number, record in records[1:]:
        if "key" in record and METRIC <= record.keys():
            run.metrics.append(record)
        elif "params" in record:
            run.params.update(record["params"])
        elif "tags" in record:
            run.tags.update(record["tags"])
        elif "artifact" in record:
            run.artifacts.append((record["artifact"], record.get("artifact_path")))
        elif "text" in record:
            run.texts.append((record["text"], record["artifact_file"]))
        elif "status" in record:
            run.status, run.error = record["status"], record.get("error")
            run.end_time = record.get("end_time") or max(stamps, default=None)
        else:  # nothing is left out without a word
            raise NotAJournal(f"{path}: line {number} is no journal line this import knows ({sorted(record)}).")
    return run


def collect(path: Path) -> tuple[list[JournalRun], list[Path]]:
    """The runs of a journal file, or of every journal in a folder, each parent before its children;
    and the journals of metrics alone found in a folder. A file's ancestors' journals beside it
    come with it, so that it keeps its place under its parent."""
    if path.is_dir():
        files = sorted(path.glob("*.jsonl"))
        if not files:
            raise NotAJournal(f"{path} holds no journals (<run id>.jsonl).")
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"{path} does not exist: name a journal (<paths.artifacts>/metrics-journal/"
                                "<run id>.jsonl) or the folder that holds them.")
    runs, metrics_only = {}, []
    for file in files:
        run = read(file)
        if run is None:
            if path.is_file():
                raise NotAJournal(f"{file} holds metrics alone: it is what the MLflow tracker keeps of run "
                                  f"{file.stem} when its store stops answering, not a tracking=journal run.")
            metrics_only.append(file)
            continue
        runs[run.run_id] = run
    if path.is_file():
        run = next(iter(runs.values()))
        while run.parent and run.parent not in runs and (path.parent / f"{run.parent}.jsonl").is_file():
            run = read(path.parent / f"{run.parent}.jsonl")
            if run is None:
                break
            runs[run.run_id] = run

    def depth(run: JournalRun) -> int:
        seen = {run.run_id}
        while run.parent in runs and run.parent not in seen:
            run = runs[run.parent]
            seen.add(run.run_id)
        return len(seen)

    return sorted(runs.values(), key=lambda r: (depth(r), r.start_time or 0, r.run_id)), metrics_only


class Importer:
    """Puts journal runs into one MLflow store."""

    def __init__(self, client, experiment: str | None, say=print):
        self.client, self.say = client, say
        self.experiment = experiment  # --experiment; else each run's own
        self._experiments, token = {}, None
        while True:  # every experiment: an earlier import may have gone to another (--experiment)
            page = client.search_experiments(page_token=token)
            self._experiments.update({e.name: e.experiment_id for e in page})
            if not (token := page.token):
                break

    def experiment_id(self, name: str) -> str:
        if name not in self._experiments:
            self._experiments[name] = self.client.create_experiment(name)
        return self._experiments[name]

    def imported(self, journal_run_id: str):
        """The store's run imported from this journal run, in any experiment; None if there is none.
        One left RUNNING is an import that stopped part way (an import always ends its runs): it
        is deleted, to be imported again whole."""
        if not self._experiments:
            return None
        found = self.client.search_runs(list(self._experiments.values()), f"tags.`{JOURNAL_RUN_ID}` = '{journal_run_id}'")
        for run in found:
            if run.info.status == "RUNNING":
                self.client.delete_run(run.info.run_id)
                self.say(f"deleted run {run.info.run_id}: an import of journal run {journal_run_id} that stopped part way")
        return next((run for run in found if run.info.status != "RUNNING"), None)

    def put(self, run: JournalRun, parent: str | None) -> tuple[str, str]:
        """Makes `run` in the store under run id `parent` (None: at the top); its id and its line."""
        from mlflow.entities import Metric, Param
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

        experiment = self.experiment or run.experiment or default_experiment()
        tags = {MLFLOW_RUN_NAME: run.name, **{k: str(v) for k, v in run.tags.items()}, JOURNAL_RUN_ID: run.run_id}
        if parent:
            tags[MLFLOW_PARENT_RUN_ID] = parent
        elif run.parent:
            tags[JOURNAL_PARENT_RUN_ID] = run.parent
        if run.error:
            tags["error"] = run.error
        run_id = self.client.create_run(self.experiment_id(experiment), start_time=run.start_time, tags=tags,
                                        run_name=run.name).info.run_id
        params = [Param(k, param_value(v)) for k, v in run.params.items()]
        for i in range(0, len(params), PARAM_BATCH):
            self.client.log_batch(run_id, params=params[i : i + PARAM_BATCH])
        metrics = [Metric(m["key"], float(m["value"]), int(m["timestamp"]), int(m["step"] or 0)) for m in run.metrics]
        for i in range(0, len(metrics), METRIC_BATCH):
            self.client.log_batch(run_id, metrics=metrics[i : i + METRIC_BATCH])
        for text, artifact_file in run.texts:
            self.client.log_text(run_id, text, artifact_file)
        uploaded, gone = 0, []
        for local, artifact_path in run.artifacts:
            # A folder's files go under artifact_path, as Tracker.log_artifacts sends them.
            if Path(local).is_dir():
                self.client.log_artifacts(run_id, local, artifact_path)
            elif Path(local).is_file():
                self.client.log_artifact(run_id, local, artifact_path)
            else:
                gone.append(local)
                continue
            uploaded += 1
        status = run.status or NO_STATUS
        self.client.set_terminated(run_id, status, run.end_time)
        where = f"under run {parent}" if parent else (f"at the top (its parent's journal {run.parent}.jsonl is not "
                                                      "there)" if run.parent else "at the top")
        line = (f"imported {run.path.name} ({run.name}) as run {run_id} in experiment {experiment}, {where}: "
                f"{len(params)} params, {len(metrics)} metric values, {uploaded + len(run.texts)} artifacts, {status}"
                + (" (the journal ends without a status)" if run.status is None else "")
                + (f"; {len(gone)} named file(s) no longer exist: {', '.join(gone[:3])}" if gone else ""))
        return run_id, line


def default_uri() -> str:
    """MLFLOW_TRACKING_URI, else the pipeline's own local store (conf/tracking/local.yaml: sqlite:///mlflow.db
    in the working directory, MLflow's default too)."""
    from omegaconf import OmegaConf

    return os.environ.get("MLFLOW_TRACKING_URI") or str(OmegaConf.load(PROJECT_ROOT / "conf/tracking/local.yaml").uri)


def default_experiment() -> str:
    from omegaconf import OmegaConf

    return str(OmegaConf.load(PROJECT_ROOT / "conf/tracking/local.yaml").experiment)


def import_journals(path: Path, uri: str, experiment: str | None = None, say=print) -> int:
    """Imports the journal runs at `path` into the store at `uri`; how many were new."""
    runs, metrics_only = collect(path)  # every journal read before anything is written (or MLflow imported)
    from mlflow.tracking import MlflowClient

    if uri.startswith(("http://", "https://")):
        require_server(uri)
    check_store(uri)
    importer = Importer(MlflowClient(tracking_uri=uri), experiment, say)
    in_store: dict[str, str] = {}  # journal run id -> the store's run id
    new = 0
    for run in runs:
        found = importer.imported(run.run_id)
        if found is not None:
            in_store[run.run_id] = found.info.run_id
            say(f"skipped {run.path.name} ({run.name}): already imported as run {found.info.run_id}")
            continue
        parent = None
        if run.parent:
            parent = in_store.get(run.parent)
            if parent is None and (earlier := importer.imported(run.parent)) is not None:
                parent = in_store[run.parent] = earlier.info.run_id
        in_store[run.run_id], line = importer.put(run, parent)
        say(line)
        new += 1
    for file in metrics_only:
        say(f"skipped {file.name}: metrics alone, kept by the MLflow tracker for run {file.stem} when its store "
            "stopped answering; not a tracking=journal run")
    say(f"{new} run(s) imported, {len(runs) - new} already there, into {uri}")
    return new


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.journal",
                                     description="Puts tracking=journal runs into an MLflow store.")
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("import", help="import journal runs into an MLflow store",
                                  description="Imports journal runs (<paths.artifacts>/metrics-journal/<run id>.jsonl) "
                                              "with their parent runs, params, tags, metrics, artifacts and status.")
    command.add_argument("path", type=Path, help="a journal file, or a folder of them")
    command.add_argument("--tracking-uri", help="the MLflow store (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    command.add_argument("--experiment", help="the experiment to import into (default: the one each run was tracked for)")
    args = parser.parse_args(argv)
    # MLflow announces each migration of a new store's tables; the lines a run are enough.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    uri = args.tracking_uri or default_uri()
    try:
        import_journals(args.path, uri, args.experiment)
    except Exception as error:
        words = " ".join(str(error).split())
        if isinstance(error, USER_ERRORS):  # a bad path, a file that is no journal, a damaged or unreachable store
            print(f"error: {words}", file=sys.stderr)
            return 1
        from mlflow.exceptions import MlflowException  # only now: bad input is told without MLflow's 6 s import

        if not isinstance(error, MlflowException):
            raise  # a bug: its traceback
        print(f"error: the MLflow store at {uri} refused the import ({words}). The runs imported so far are kept; "
              "importing again adds the rest (a run left part way is made again).", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
