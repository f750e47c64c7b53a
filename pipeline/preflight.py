"""Everything checked before any work, and the pre-flight report of it.

A run stops at the first failed check, with its one-line reason, before anything is written.
`stage=check` (alone for the whole chain, or with the stages to check: stage=[check,train,export])
runs every check instead, prints each one passed or failed with what it verified, and runs nothing.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from pipeline import distributed, hardware
from pipeline.artifacts import stage_dir
from pipeline.config import validate
from pipeline.contract import USER_ERRORS
from pipeline.graph import STAGES, downstream, selected_stages, stage_names
from pipeline.models import base_config
from pipeline.tracking import JOURNAL, check_store
from stages.quantize import group_size_chosen

log = logging.getLogger(__name__)
# The stages that make a base model (model.pretrain), and that read it: prepare its tokenizer,
# train its weights.
BASE_STAGES = ("prepare", "train")
# In `stage`, asks for the report instead of a run.
CHECK = "check"


def forced(rerun, stages: list[str]) -> set[str]:
    """The stages `rerun` asks to run again, and the selected stages that read their outputs."""
    names = stage_names(rerun) if rerun else []
    unknown = [n for n in names if n not in STAGES and n != "all"]
    if unknown:
        raise ValueError(f"rerun={names}: unknown stage {', '.join(map(repr, unknown))}. "
                         f"Valid: all, {', '.join(STAGES)} (or a list of them).")
    return set(stages) if "all" in names else set(downstream(names)) & set(stages)


def readers_of_new(cfg: DictConfig, stages: list[str], again: set[str]) -> set[str]:
    """The selected stages whose output exists but reads an output this run makes anew: reused, it
    would hold what it measured of the old one, or nothing of it (an evaluate run before there was
    any GGUF file, found again after the export has made them)."""
    fresh, found = set(), set()
    for name in stages:  # chain order: a stage's readers come after it
        if not reused(cfg, name, again | found):
            fresh.add(name)
        elif fresh & set(STAGES[name].STAGE.reads):
            found.add(name)
            fresh.add(name)
    return found


def report_only(stage) -> tuple[bool, object]:
    """Whether `stage` asks for the pre-flight report, and the stages it is about."""
    names = stage_names(stage)
    if CHECK not in names:
        return False, stage
    rest = [n for n in names if n != CHECK]
    return True, rest or "all"


def require_writable(cfg: DictConfig) -> str:
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
    return f"outputs go to {Path(cfg.paths.fixed or cfg.paths.artifacts).resolve()}"


@dataclass
class Checks:
    """Named checks run in order. In a run (`report` false) the first failure raises; in a report
    each one's outcome is kept: (name, passed, what it verified or why it failed)."""

    report: bool
    outcomes: list[tuple[str, bool | None, str]] = field(default_factory=list)

    def __call__(self, name: str, check, *args) -> bool:
        try:
            verified = check(*args)
        except USER_ERRORS as error:
            if not self.report:
                raise
            self.outcomes.append((name, False, str(error)))
            return False
        lines = verified if isinstance(verified, list) else [verified or "passed"]
        self.outcomes.append((name, True, "; ".join(lines)))
        return True

    def skip(self, name: str, why: str) -> None:
        self.outcomes.append((name, None, why))

    @property
    def failed(self) -> list[str]:
        return [name for name, passed, _ in self.outcomes if passed is False]


def preflight(cfg: DictConfig, report: bool = False) -> dict:
    """Every check before any work: the settings, the stages and reruns asked for, the precision the
    hardware runs (written into cfg: later outputs are addressed by it, not by "auto"), the launch
    settings, where outputs go, and every selected stage's own check. Returns what the run needs,
    and under "checks" each check's outcome."""
    checks = Checks(report)
    plan = {"checks": checks, "stages": [], "again": set(), "hardware": None, "requested": cfg.train.precision,
            "reason": None, "base": None, "unchecked": set()}

    def settings():
        validate(cfg)
        plan["stages"] = selected_stages(cfg.stage)
        plan["again"] = forced(cfg.rerun, plan["stages"])
        again = ", ".join(sorted(plan["again"])) or "none"
        return f"every value within its schema; stages {', '.join(plan['stages'])}; run again: {again}"

    if not checks("settings", settings):
        return plan  # nothing else can be checked without knowing what to run

    def precision():
        hw = plan["hardware"] = hardware.detect()
        chosen, plan["reason"] = hardware.resolve_precision(cfg.train.precision, hw)
        with open_dict(cfg):
            cfg.train.precision = chosen
        log.info("precision: %s (requested %s: %s)", chosen, plan["requested"], plan["reason"])
        return f"{chosen} (requested {plan['requested']}: {plan['reason']})"

    checks("precision", precision)
    checks("group size", group_size_chosen, cfg, selected_stages(cfg.stage))
    checks("launch", lambda: distributed.resolve(cfg, plan["stages"]) or
           f"{cfg.accelerate.num_processes} process(es) on {cfg.accelerate.num_machines} machine(s)")
    checks("output folders", require_writable, cfg)
    if str(cfg.tracking.uri) != JOURNAL and distributed.main_node(cfg):
        checks("tracking store", check_store, str(cfg.tracking.uri))
    stages = plan["stages"]
    base = plan["base"] = base_config(cfg) if set(stages) & set(BASE_STAGES) else None
    for name in BASE_STAGES if base is not None else ():
        def base_check(name=name):
            try:
                return STAGES[name].check(base)
            except ValueError as error:  # its keys are model.pretrain.<data|train>.*, not the fine-tune's
                raise ValueError(f"model.pretrain (the base model's recipe, keys under model.pretrain.data and "
                                 f"model.pretrain.train): {error}") from None

        checks(f"base model: {name}", base_check)
    # A stage whose output is reused does no work: its settings passed its check when it ran, and
    # its check may cost seconds (llm-compressor's import) of a run that otherwise only looks.
    plan["again"] |= readers_of_new(cfg, stages, plan["again"])
    plan["unchecked"] = {name for name in stages if reused(cfg, name, plan["again"])}
    for name in stages:
        if name in plan["unchecked"]:
            checks.skip(name, f"reused from {stage_dir(cfg, name)}; its settings passed when it ran "
                              f"(rerun=[{name}] runs it again)")
        else:
            checks(name, STAGES[name].check, cfg)
    # After the stages' own checks: a wrong setting is the first thing to say.
    checks("upstream outputs", upstream_outputs, cfg, stages)
    return plan


# Upstream outputs a stage can do without: it measures, serves or reports what exists of them.
OPTIONAL_UPSTREAM = ("quantize", "export")


def upstream_outputs(cfg: DictConfig, stages: list[str]) -> str:
    """Every output the selected stages read and none of them makes must exist at its address for
    these settings: an address moves with any setting or code change, and a stage run alone would
    otherwise fail at its start (prepare, train) or measure less than asked without a word (an
    evaluate that finds no GGUF files). A missing optional one (quantize, export) is said on the
    console; a missing required one is refused."""
    # The report is left to itself: it reads runs of other precisions and seeds too, and says which
    # it lacks (a missing run is never a number).
    wanted = {up: name for name in stages if name != "report" for up in STAGES[name].STAGE.reads if up not in stages}
    missing = [(up, reader) for up, reader in wanted.items() if not stage_dir(cfg, up).is_dir()]
    required = [(up, reader) for up, reader in missing if up not in OPTIONAL_UPSTREAM]
    if required:
        up, reader = required[0]
        raise FileNotFoundError(f"stage {reader} reads the {up} stage's output, and none exists for these settings "
                                f"(looked for {stage_dir(cfg, up)}; a change of settings or code gives an output a new "
                                f"address): add {up} to the stages, e.g. stage=[{up},{','.join(stages)}], or stage=all.")
    for up, reader in missing:
        log.warning("stage %s: no %s output for these settings (%s), so what it would have made is not %s; "
                    "add %s to the stages to make it, e.g. stage=[%s,%s]", reader, up, stage_dir(cfg, up),
                    {"evaluate": "measured", "serve": "served"}.get(reader, "read"), up, up,
                    ",".join(stages))
    if not wanted:
        return "every output the stages read is made in this run"
    found = [up for up in wanted if (up, wanted[up]) not in missing]
    return (f"read from earlier runs: {', '.join(found) or 'none'}"
            + (f"; missing, so left out: {', '.join(up for up, _ in missing)}" if missing else ""))


def reused(cfg: DictConfig, name: str, again: set) -> bool:
    """Whether stage `name` finds its finished output at its address and is not to run again."""
    return STAGES[name].STAGE.reusable and name not in again and stage_dir(cfg, name).is_dir()


def print_report(plan: dict, stage) -> int:
    """The pre-flight report on stdout; the exit status: 1 where a check failed."""
    checks = plan["checks"]
    marks = {True: "passed", False: "FAILED", None: "skipped"}
    stage = ",".join(stage_names(stage))
    print(f"pre-flight checks of stage={stage} (nothing is run):")
    width = max(len(name) for name, _, _ in checks.outcomes)
    for name, passed, detail in checks.outcomes:
        print(f"  {marks[passed]:7} {name:{width}}  {detail}")
    failed = checks.failed
    print(f"{len(checks.outcomes) - len(failed)} of {len(checks.outcomes)} checks passed"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    sys.stdout.flush()
    return 1 if failed else 0
