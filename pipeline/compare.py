"""train.precision=compare: the whole comparison from one command.

The runs a user would otherwise start one by one (a Hydra sweep over train.precision, then the
noise-floor run, then the report), in order, each a pipeline run of its own in MLflow with the
settings a single run of it would have: so each output has the address that run would give it,
and is reused by (or reuses) the sweep, `make compare` and single runs alike.

1. Each precision of report.precisions this machine trains natively, fp32 first
   (pipeline.hardware.compared_precisions): the selected stages but the report. Where that is fp32
   alone (a CPU without bf16 instructions), the report recommends it provisionally and says why.
2. The noise floor: fp32 again at report.noise_seed, trained, quantized, exported and evaluated
   against the main seed's fp32 model (evaluate.reference_seed), so that the report can tell a
   difference between precisions from seed-to-seed noise. Not served: its speed is fp32's. Where
   fp32 is the only precision, only its trained model is measured.
3. The report, once, over all of them.

Every run's checks pass before the first stage starts. The noise floor's settings differ from the
fp32 run's in the seed alone, so fp32's checks are its checks; the one of its own, that the
reference model exists, is made when fp32 has trained it.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig, open_dict

from pipeline import hardware
from pipeline.artifacts import keep_log, variant
from pipeline.config import validate
from pipeline.console import captured, say
from pipeline.contract import PipelineError
from pipeline.graph import selected_stages
from pipeline.preflight import preflight, print_report, report_only
from pipeline.runner import checked, chosen, execute, finish, tracker_for
from pipeline.tracking import quiet_libraries

# What the noise-floor run makes: enough to measure each format of a second fp32 model.
NOISE_STAGES = ("prepare", "train", "quantize", "export", "evaluate")
# Where fp32 is the one precision trained, no difference between precisions is set against the
# floor at each format: the trained model's is the floor, and the formats' would double the time.
ALONE_NOISE_STAGES = ("prepare", "train", "evaluate")


@dataclass
class Part:
    """One run of the comparison: what it is, in words and as the name of its MLflow run."""
    title: str
    run_name: str
    cfg: DictConfig
    # The noise floor: checked with the fp32 run, whose settings it shares but for the seed.
    noise: bool = False


def parts(cfg: DictConfig, precisions: list[str]) -> list[Part]:
    """The comparison's runs, in the order they run (fp32 first: the noise floor and every other
    precision are measured against it)."""
    stages = selected_stages(cfg.stage)
    chain = [s for s in stages if s != "report"]
    r, model = cfg.report, cfg.model.name
    found = [Part(p, f"{model}-{p}", variant(cfg, {"stage": chain, "train.precision": p})) for p in precisions if chain]
    noise = [s for s in chain if s in (NOISE_STAGES if len(precisions) > 1 else ALONE_NOISE_STAGES)]
    if "train" in noise:
        found.append(Part(f"noise floor (fp32 at seed {r.noise_seed})", f"{model}-fp32-seed{r.noise_seed}",
                          variant(cfg, {"stage": noise, "train.precision": "fp32", "seed": r.noise_seed,
                                        "evaluate.reference_seed": cfg.seed}), noise=True))
    if "report" in stages:
        found.append(Part("report", f"{model}-report", variant(cfg, {"stage": ["report"], "train.precision": "fp32"})))
    return found


def comparison(cfg: DictConfig) -> tuple[list[Part], list[str], dict[str, str]]:
    """The runs train.precision=compare makes of these settings on this machine, the precisions it
    trains, and why each other one of report.precisions is left out."""
    validate(cfg)  # the settings first: a bad one is one line, before the hardware is asked anything
    with captured(None if cfg.verbose else keep_log("preflight", "")):
        hw = hardware.detect()
        precisions, left_out = hardware.compared_precisions(cfg.report.precisions, hw)
    return parts(cfg, precisions), precisions, left_out


def checked_runs(cfg: DictConfig) -> list[DictConfig]:
    """The settings of each run a command makes that its pre-flight checks check: the runs of a
    comparison but the noise floor (the fp32 run's settings at another seed), or the one run."""
    if cfg.train.precision != hardware.COMPARE:
        return [cfg]
    return [part.cfg for part in comparison(cfg)[0] if not part.noise]


def run_comparison(cfg: DictConfig) -> None:
    quiet_libraries()
    only, stages = report_only(cfg.stage)
    with open_dict(cfg):
        cfg.stage = stages
    runs, precisions, left_out = comparison(cfg)
    if only:
        check_each(runs)
        return
    say(f"comparing training precisions {', '.join(precisions)} with the fp32 noise floor: {len(runs)} runs"
        + "".join(f"; {p} left out: {why}" for p, why in left_out.items()))
    plans = {id(p): checked(p.cfg, announce=False) for p in runs if not p.noise}  # every check, before any work
    tracker = tracker_for(cfg)
    for number, part in enumerate(runs, 1):
        say(f"== {number}/{len(runs)}: {part.title}")
        plan = plans.get(id(part)) or checked(part.cfg, announce=False)
        chosen(part.cfg, plan)
        execute(part.cfg, plan, tracker, part.run_name)
    finish(runs[-1].cfg, selected_stages(cfg.stage))


def check_each(runs: list[Part]) -> None:
    """stage=check: each run's pre-flight report (the noise floor's is fp32's, as above)."""
    failed = 0
    for part in runs:
        if part.noise:
            say(f"{part.title}: the settings of the fp32 run at another seed, checked with it")
            continue
        say(f"== {part.title}")
        failed += print_report(preflight(part.cfg, report=True), part.cfg.stage)
    if failed:
        raise PipelineError("the pre-flight checks above failed; nothing was run.")
