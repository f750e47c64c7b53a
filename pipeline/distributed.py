"""Several training processes through `accelerate launch`, started from the one entry point.

`accelerate=ddp|fsdp|deepspeed_zero2|deepspeed_zero3` selects an Accelerate launch config. The
pipeline process keeps the MLflow run; it writes the resolved config to a scratch directory,
launches the processes, and they run the stage with it. Only the main process (global rank 0)
logs and writes the stage's output; a process that fails leaves its traceback for the pipeline
process, which fails the stage with it.

The launched processes run pipeline.worker.
"""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from pipeline.contract import PipelineError
from pipeline.hardware import PRECISION_TABLE

# Sharded training, only on GPUs (FSDP fails on a CPU, FSDP2 falls back to DDP there).
SHARDED = {"FSDP", "DEEPSPEED"}

log = logging.getLogger(__name__)


def launched(cfg: DictConfig) -> bool:
    return cfg.accelerate.distributed_type != "NO"


def main_node(cfg: DictConfig) -> bool:
    """Whether this machine runs global rank 0, the process that logs and writes."""
    return cfg.accelerate.get("machine_rank", 0) == 0


def resolve(cfg: DictConfig, stages: list[str]) -> None:
    """Checks the launch settings and fills in num_processes (it sets the global batch, so the
    train output directory depends on it). Fails before any work with the setting to change."""
    a = cfg.accelerate
    kind = a.distributed_type
    if kind == "NO":
        if a.num_processes != 1:
            raise ValueError(f"accelerate.num_processes={a.num_processes} needs a launch config that starts several "
                             "processes: accelerate=ddp (GPUs, or CPU processes on gloo), fsdp, deepspeed_zero2 or "
                             "deepspeed_zero3.")
        return

    import torch

    gpus = torch.cuda.device_count()
    # Later stages only need num_processes (it is part of the train output's address), so a model
    # trained on GPUs can be evaluated with the same settings on a CPU machine.
    training = "train" in stages
    if training and kind in SHARDED and gpus == 0:
        raise ValueError(f"accelerate.distributed_type={kind} needs CUDA GPUs and this machine has none. "
                         "On CPUs use accelerate=ddp, which runs the processes on gloo.")
    if training and kind == "DEEPSPEED" and importlib.util.find_spec("deepspeed") is None:
        raise ValueError("accelerate.distributed_type=DEEPSPEED needs DeepSpeed: pip install 'precision-pipeline[deepspeed]'.")
    if training and kind in SHARDED and cfg.model.lora.enabled:
        raise ValueError(f"model.lora.enabled=true is supported with accelerate=ddp, not {kind}: the LoRA merge "
                         "needs the whole model in one process.")
    if a.num_processes is None:
        if gpus == 0:
            raise ValueError("accelerate.num_processes=null means one process per GPU, and this machine has no GPU: "
                             "set accelerate.num_processes=N to run N CPU processes.")
        with open_dict(cfg):
            a.num_processes = gpus * a.num_machines
    if a.num_machines > 1 and not a.main_process_ip:
        raise ValueError(f"accelerate.num_machines={a.num_machines} needs accelerate.main_process_ip, "
                         "the address of the machine with machine_rank=0.")
    if not main_node(cfg) and stages != ["train"]:
        raise ValueError(f"accelerate.machine_rank={a.machine_rank} joins another machine's training: "
                         f"run only stage=train there (got stage={','.join(stages)}).")


def launch_config(cfg: DictConfig) -> dict:
    """The Accelerate config file for this run: the selected group, plus what the pipeline decides."""
    from pipeline.server import free_port

    settings = OmegaConf.to_container(cfg.accelerate, resolve=True)
    config = {k: v for k, v in settings.items() if v is not None and k != "extra"} | settings["extra"]
    config["mixed_precision"] = PRECISION_TABLE[cfg.train.precision].mixed_precision
    if config.get("main_process_port") is None and config.get("num_machines", 1) == 1:
        # Accelerate's fixed default port would collide between runs on one machine.
        config["main_process_port"] = free_port()
    return config


def launch(cfg: DictConfig, stage: str, run_id: str | None) -> None:
    """Runs `stage` in `cfg.accelerate.num_processes` processes; raises with the failing rank's error."""
    with tempfile.TemporaryDirectory(prefix="pipeline-launch-") as scratch:
        scratch = Path(scratch)
        OmegaConf.save(cfg, scratch / "config.yaml", resolve=True)
        OmegaConf.save(OmegaConf.create(launch_config(cfg)), scratch / "accelerate.yaml")
        errors = scratch / "errors"
        errors.mkdir()
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(scratch / "accelerate.yaml"),
                   "-m", "pipeline.worker", str(scratch / "config.yaml"), stage, run_id or "", str(errors)]
        log.info("launching %s in %d processes (%s)", stage, cfg.accelerate.num_processes, cfg.accelerate.distributed_type)
        returncode = subprocess.run(command).returncode
        if returncode != 0:
            raise PipelineError(failure(stage, errors, returncode, cfg.accelerate.num_processes))


def failure(stage: str, errors: Path, returncode: int, processes: int) -> str:
    reports = sorted(errors.glob("rank-*.txt"), key=lambda p: p.stat().st_mtime_ns)
    if not reports:
        return (f"accelerate launch of stage {stage} exited with status {returncode} and no process reported a "
                "Python error: one was killed (out of memory, or a signal). torch's failure summary is in the log above.")
    # The first to fail is the cause; the others usually failed because it left their collectives.
    first = reports[0]
    rank = first.stem.removeprefix("rank-")
    text = first.read_text().rstrip()
    return f"stage {stage} failed on rank {rank} of {processes}: {text.splitlines()[-1]}\n{text}"
