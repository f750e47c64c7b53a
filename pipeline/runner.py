"""Runs the selected stages in chain order, each in its own MLflow child run.

A stage whose output already exists at its address (settings, code and inputs all the same) is
not run again: its stored result is logged to its child run, tagged `reused`. `rerun=[stage]`
(or `rerun=all`) runs a stage again, and every selected stage after it that reads its output.
"""

from __future__ import annotations

import logging
from pathlib import Path

from filelock import FileLock
from omegaconf import DictConfig, OmegaConf, open_dict

from pipeline import distributed, llamacpp
from pipeline.artifacts import keep_log, references, stage_dir, verify_stage_output
from pipeline.config import validate
from pipeline.console import captured, say, shown, stage_lines
from pipeline.contract import PipelineError
from pipeline.graph import STAGES, selected_stages, upstream
from pipeline.preflight import BASE_STAGES, preflight, print_report, report_only, reused
from pipeline.tracking import JOURNAL, NoTracker, flatten, installed_packages, open_tracker, quiet_libraries, run_tags

log = logging.getLogger(__name__)


def _hydra_context() -> dict[str, str]:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    hc = HydraConfig.get()
    tags = {"hydra.overrides": " ".join(hc.overrides.task)}
    if hc.mode.name == "MULTIRUN":
        tags.update({"hydra.sweep_dir": hc.sweep.dir, "hydra.job_num": str(hc.job.num)})
    return tags


def verify_inputs(cfg: DictConfig, name: str, reuse: bool) -> None:
    """Before stage `name` reads anything: every upstream output it may read (and its own, where it
    is reused) is still what its stage wrote, as `verify` asks. The report checks each run it
    reads itself."""
    for stage in [*upstream(name), *([name] if reuse else [])]:
        if stage_dir(cfg, stage).is_dir():
            verify_stage_output(cfg, stage)
    for stage in STAGES[name].STAGE.references:
        for reference in references(cfg).values():
            if stage_dir(reference, stage).is_dir():
                verify_stage_output(reference, stage)


def stage_log(cfg: DictConfig, out: Path) -> Path | None:
    """Where a stage's third-party output goes while it runs (None: verbose=true, the terminal):
    <root>/logs/<stage>/<output>.log, named after its output, in a tree of its own so that a
    stage's folder holds only outputs."""
    return None if cfg.verbose else out.parent.parent / "logs" / out.parent.name / f"{out.name}.log"


def pretrain(base: DictConfig, tags: dict, tracker) -> None:
    """The base model of model.pretrain, made by the prepare and train stages on its recipe in the
    machine cache, or reused from there (by every checkout on this machine) in a child run "base".
    Parallel jobs wait for the one that builds it."""
    root = Path(base.paths.artifacts)
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(root / "build.lock"):
        reuse = all(stage_dir(base, name).is_dir() for name in BASE_STAGES)
        with tracker.run("base", {**tags, "stage": "base", "reused": str(reuse).lower(),
                                  "output": str(stage_dir(base, "train"))}):
            tracker.log_params(flatten(base))
            for name in BASE_STAGES:
                out = stage_dir(base, name)
                if out.is_dir():
                    say(f"base model: reusing its {name} output {shown(out)} (delete it to build it again)")
                    verify_stage_output(base, name, rebuild=f"delete {out} to build it again")
                    STAGES[name].record(base, tracker)
                else:
                    log_file = stage_log(base, out)
                    with stage_lines(f"base model: {name} (once for this machine)", out, log_file):
                        log.info("base model: %s, once for this machine, into %s", name, out)
                        STAGES[name].run(base, tracker)


def run_stage(cfg: DictConfig, name: str, label: str, out: Path, plan: dict, tags: dict, tracker) -> None:
    module = STAGES[name]
    reuse = reused(cfg, name, plan["again"])
    with tracker.run(name, {**tags, "stage": name, "reused": str(reuse).lower(), "output": str(out)}):
        tracker.log_params(flatten(cfg))
        if reuse:
            verify_inputs(cfg, name, reuse)
            say(f"{label}: reusing {shown(out)} (rerun=[{name}] runs it again)")
            module.record(cfg, tracker)
            return
        log_file = stage_log(cfg, out)
        try:
            with stage_lines(label, out, log_file):
                if name in plan["unchecked"]:
                    # Its address moved since the checks (a reference an earlier stage just made).
                    module.check(cfg)
                verify_inputs(cfg, name, reuse)
                log.info("stage %s", name)
                if module.STAGE.launchable and distributed.launched(cfg):
                    distributed.launch(cfg, name, tracker.run_id)
                else:
                    module.run(cfg, tracker)
        finally:  # a failed stage's log most of all
            if log_file is not None and log_file.is_file():
                tracker.log_artifact(log_file, "log")


def exports(cfg: DictConfig) -> bool:
    """Whether the run exports, and its settings are valid: a bad one is reported by the checks at
    once, not after the imports that forking the converter costs (5 s in a new interpreter)."""
    try:
        validate(cfg)
        return "export" in selected_stages(cfg.stage)
    except ValueError:
        return False  # the checks say what is wrong with it


def run(cfg: DictConfig) -> None:
    quiet_libraries()
    only, stages = report_only(cfg.stage)
    if only:
        with open_dict(cfg):
            cfg.stage = stages
        if print_report(preflight(cfg, report=True), stages):
            raise PipelineError("the pre-flight checks above failed; nothing was run.")
        return
    plan = checked(cfg)
    execute(cfg, plan)
    finish(cfg, plan["stages"])


def checked(cfg: DictConfig, announce: bool = True) -> dict:
    """Every pre-flight check (pipeline.preflight), the first failure raised; what was chosen, said
    (or, with `announce` false, left for `chosen` to say when the run starts)."""
    # The checks import the libraries, whose import-time warnings are no reading for the terminal.
    with captured(None if cfg.verbose else keep_log("preflight", "")):
        if exports(cfg):
            llamacpp.ConverterProcess.fork_early()  # before the checks compute anything
        plan = preflight(cfg)
    if announce:
        chosen(cfg, plan)
    return plan


def chosen(cfg: DictConfig, plan: dict) -> None:
    say(f"precision: {cfg.train.precision} (requested {plan['requested']}: {plan['reason']})")
    # What else the pipeline chose for this model, where it was asked to (quantize.group_size=auto).
    for name, _, detail in plan["checks"].outcomes:
        if name == "group size" and detail.startswith("quantize.group_size=auto"):
            say(detail)


def tracker_for(cfg: DictConfig):
    # The other machines of a multi-machine training only lend their processes to rank 0's run.
    return open_tracker(cfg) if distributed.main_node(cfg) else NoTracker()


def execute(cfg: DictConfig, plan: dict, tracker=None, run_name: str | None = None) -> None:
    """The checked stages in chain order, under one pipeline run in MLflow (`run_name`, by default
    <model>-<precision>) with a child run a stage."""
    tags = run_tags(plan["hardware"].tags())
    tracker = tracker or tracker_for(cfg)
    with tracker.run(run_name or f"{cfg.model.name}-{cfg.train.precision}",
                     {**tags, **_hydra_context(), "precision.requested": plan["requested"],
                      "precision.reason": plan["reason"], "stages": ",".join(plan["stages"])}):
        tracker.log_params(flatten(cfg))
        tracker.log_text(OmegaConf.to_yaml(cfg, resolve=True), "resolved_config.yaml")
        tracker.log_text(installed_packages(), "environment.txt")
        if plan["base"] is not None:
            pretrain(plan["base"], tags, tracker)
        for number, name in enumerate(plan["stages"], 1):
            out = stage_dir(cfg, name)
            # Jobs of a sweep share outputs (one prepare for every precision): the first to reach one
            # builds it while the others wait, then reuse it. Locks sit beside the logs, in a tree of
            # their own: <root>/locks/<stage>/<output>.lock.
            lock = out.parent.parent / "locks" / out.parent.name / f"{out.name}.lock"
            lock.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(lock):
                run_stage(cfg, name, f"[{number}/{len(plan['stages'])}] {name}", out, plan, tags, tracker)


def finish(cfg: DictConfig, stages: list[str]) -> None:
    """The last lines: where the report is, and how to look at it and at the runs."""
    if "report" in stages:
        report = stage_dir(cfg, "report")
        say(f"report: {shown(report / 'report.md')} (with plots: open {shown(report / 'report.html')} in a browser)")
    uri = str(cfg.tracking.uri)
    if uri == JOURNAL:
        say(f"runs: {shown(Path(cfg.paths.artifacts) / 'metrics-journal')} (a journal a run, no MLflow store)")
        return
    browse = (f"open {uri}" if uri.startswith("http") else
              f"mlflow ui --backend-store-uri {uri}, then open http://127.0.0.1:5000")
    say(f"runs in MLflow: {browse}")
