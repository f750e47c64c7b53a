"""Runs the selected stages in chain order, each in its own MLflow child run."""

from __future__ import annotations

import importlib
import logging

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from pipeline import distributed, hardware
from pipeline.tracking import NoTracker, Tracker, flatten, installed_packages, run_tags

# Chain order: every stage reads what the ones before it wrote.
STAGES = ("prepare", "train", "quantize", "export", "evaluate", "serve", "report")

log = logging.getLogger(__name__)


def quiet_libraries() -> None:
    """The pipeline's own log lines are enough: Accelerate logs every checkpoint file and httpx
    every request at INFO, and transformers draws a progress bar per file it loads or saves."""
    from transformers.utils import logging as transformers_logging

    logging.getLogger("accelerate").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    transformers_logging.disable_progress_bar()


def selected_stages(stage) -> list[str]:
    names = list(stage) if isinstance(stage, (list, ListConfig)) else [str(stage)]
    unknown = [n for n in names if n not in STAGES and n != "all"]
    if unknown or not names:
        raise ValueError(f"Unknown stage {', '.join(map(repr, unknown)) or '(none)'}. "
                         f"Valid: all, {', '.join(STAGES)} (or a list of them, e.g. stage=[prepare,train]).")
    if "all" in names:
        return list(STAGES)
    return [s for s in STAGES if s in names]


def _hydra_context() -> dict[str, str]:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    hc = HydraConfig.get()
    tags = {"hydra.overrides": " ".join(hc.overrides.task)}
    if hc.mode.name == "MULTIRUN":
        tags.update({"hydra.sweep_dir": hc.sweep.dir, "hydra.job_num": str(hc.job.num)})
    return tags


def run(cfg: DictConfig) -> None:
    stages = selected_stages(cfg.stage)
    quiet_libraries()
    modules = {name: importlib.import_module(f"stages.{name}") for name in stages}

    hw = hardware.detect()
    requested = cfg.train.precision
    precision, reason = hardware.resolve_precision(requested, hw)
    with open_dict(cfg):
        # Later stages' output paths depend on the precision actually used, not on "auto".
        cfg.train.precision = precision
    log.info("precision: %s (requested %s: %s)", precision, requested, reason)

    # Every stage validates its settings before any of them starts expensive work.
    distributed.resolve(cfg, stages)
    for module in modules.values():
        module.check(cfg)

    tags = run_tags(hw.tags())
    # The other machines of a multi-machine training only lend their processes to rank 0's run.
    tracker = Tracker(cfg) if distributed.main_node(cfg) else NoTracker()
    run_name = f"{cfg.model.name}-{precision}"
    with tracker.run(run_name, {**tags, **_hydra_context(), "precision.requested": requested,
                                "precision.reason": reason, "stages": ",".join(stages)}):
        tracker.log_params(flatten(cfg))
        tracker.log_text(OmegaConf.to_yaml(cfg, resolve=True), "resolved_config.yaml")
        tracker.log_text(installed_packages(), "environment.txt")
        for name in stages:
            log.info("stage %s", name)
            with tracker.run(name, {**tags, "stage": name}):
                tracker.log_params(flatten(cfg))
                if name == "train" and distributed.launched(cfg):
                    distributed.launch(cfg, name, tracker.run_id)
                else:
                    modules[name].run(cfg, tracker)
