"""Runs the selected stages in chain order, each in its own MLflow child run.

A stage whose output already exists at its address (settings, code and inputs all the same) is
not run again: its stored result is logged to its child run, tagged `reused`. `rerun=[stage]`
(or `rerun=all`) runs a stage again, and every selected stage after it that reads its output.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from pipeline import distributed, hardware
from pipeline.artifacts import stage_dir
from pipeline.config import validate
from pipeline.graph import STAGES, downstream, selected_stages
from pipeline.models import base_config
from pipeline.tracking import NoTracker, Tracker, flatten, installed_packages, quiet_libraries, run_tags

log = logging.getLogger(__name__)
# The stages that make a base model (model.pretrain), and that read it: prepare its tokenizer,
# train its weights.
BASE_STAGES = ("prepare", "train")


def forced(rerun, stages: list[str]) -> set[str]:
    """The stages `rerun` asks to run again, and the selected stages that read their outputs."""
    names = list(rerun) if isinstance(rerun, (list, ListConfig)) else [str(rerun)] if rerun else []
    unknown = [n for n in names if n not in STAGES and n != "all"]
    if unknown:
        raise ValueError(f"rerun={names}: unknown stage {', '.join(map(repr, unknown))}. "
                         f"Valid: all, {', '.join(STAGES)} (or a list of them).")
    return set(stages) if "all" in names else set(downstream(names)) & set(stages)


def require_writable(cfg: DictConfig) -> None:
    """Where outputs go must take files: checked before any work (and without writing anything),
    not found out by a stage."""
    for key in ("paths.artifacts", "paths.fixed"):
        where = OmegaConf.select(cfg, key)
        if where is None:
            continue
        path = Path(where).resolve()
        existing = next(p for p in (path, *path.parents) if p.exists())
        reason = (f"{existing} is not a directory" if not existing.is_dir() else
                  f"{existing} is not writable by this user" if not os.access(existing, os.W_OK | os.X_OK) else None)
        if reason:
            raise NotADirectoryError(f"{key}={where!r} is not a writable directory ({reason}). "
                                     f"Point {key} at a directory this user can write.")


def _hydra_context() -> dict[str, str]:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    hc = HydraConfig.get()
    tags = {"hydra.overrides": " ".join(hc.overrides.task)}
    if hc.mode.name == "MULTIRUN":
        tags.update({"hydra.sweep_dir": hc.sweep.dir, "hydra.job_num": str(hc.job.num)})
    return tags


def preflight(cfg: DictConfig) -> dict:
    """Everything checked before any work: the stages and reruns asked for, the precision the
    hardware runs (written into cfg: later outputs are addressed by it, not by "auto"), the launch
    settings, where outputs go, and every selected stage's own check. Returns what the run needs."""
    validate(cfg)
    stages = selected_stages(cfg.stage)
    again = forced(cfg.rerun, stages)
    hw = hardware.detect()
    requested = cfg.train.precision
    precision, reason = hardware.resolve_precision(requested, hw)
    with open_dict(cfg):
        cfg.train.precision = precision
    log.info("precision: %s (requested %s: %s)", precision, requested, reason)
    distributed.resolve(cfg, stages)
    require_writable(cfg)
    base = base_config(cfg) if set(stages) & set(BASE_STAGES) else None
    for name in BASE_STAGES if base is not None else ():
        try:
            STAGES[name].check(base)
        except ValueError as error:  # its keys are model.pretrain.<data|train>.*, not the fine-tune's
            raise ValueError(f"model.pretrain (the base model's recipe, keys under model.pretrain.data and "
                             f"model.pretrain.train): {error}") from None
    # A stage whose output is reused does no work: its settings passed its check when it ran, and
    # its check may cost seconds (llm-compressor's import) of a run that otherwise only looks.
    unchecked = {name for name in stages if reused(cfg, name, again)}
    for name in stages:
        if name not in unchecked:
            STAGES[name].check(cfg)
    return {"stages": stages, "again": again, "hardware": hw, "requested": requested, "reason": reason, "base": base,
            "unchecked": unchecked}


def reused(cfg: DictConfig, name: str, again: set) -> bool:
    """Whether stage `name` finds its finished output at its address and is not to run again."""
    return STAGES[name].STAGE.reusable and name not in again and stage_dir(cfg, name).is_dir()


def pretrain(base: DictConfig, tags: dict, tracker) -> None:
    """The base model of model.pretrain, made by the prepare and train stages on its recipe in the
    machine cache, or reused from there (by every checkout on this machine) in a child run "base".
    Parallel jobs wait for the one that builds it."""
    from filelock import FileLock

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
                    log.info("base model: reusing its %s output %s (delete it to build it again)", name, out)
                    STAGES[name].record(base, tracker)
                else:
                    log.info("base model: %s, once for this machine, into %s", name, out)
                    STAGES[name].run(base, tracker)


def run(cfg: DictConfig) -> None:
    quiet_libraries()
    plan = preflight(cfg)
    tags = run_tags(plan["hardware"].tags())
    # The other machines of a multi-machine training only lend their processes to rank 0's run.
    tracker = Tracker(cfg) if distributed.main_node(cfg) else NoTracker()
    run_name = f"{cfg.model.name}-{cfg.train.precision}"
    with tracker.run(run_name, {**tags, **_hydra_context(), "precision.requested": plan["requested"],
                                "precision.reason": plan["reason"], "stages": ",".join(plan["stages"])}):
        tracker.log_params(flatten(cfg))
        tracker.log_text(OmegaConf.to_yaml(cfg, resolve=True), "resolved_config.yaml")
        tracker.log_text(installed_packages(), "environment.txt")
        if plan["base"] is not None:
            pretrain(plan["base"], tags, tracker)
        for name in plan["stages"]:
            module, out = STAGES[name], stage_dir(cfg, name)
            reuse = reused(cfg, name, plan["again"])
            with tracker.run(name, {**tags, "stage": name, "reused": str(reuse).lower(), "output": str(out)}):
                tracker.log_params(flatten(cfg))
                if not reuse and name in plan["unchecked"]:
                    # Its address moved since the checks (a reference an earlier stage just made).
                    module.check(cfg)
                if reuse:
                    log.info("stage %s: reusing %s (rerun=[%s] runs it again)", name, out, name)
                    module.record(cfg, tracker)
                elif module.STAGE.launchable and distributed.launched(cfg):
                    log.info("stage %s", name)
                    distributed.launch(cfg, name, tracker.run_id)
                else:
                    log.info("stage %s", name)
                    module.run(cfg, tracker)
