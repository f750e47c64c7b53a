"""Training in several processes through `accelerate launch`, from the one entry point: on this
CPU, two processes on gloo."""

import signal
import time

import psutil
import pytest
import torch
from accelerate.commands.config.config_args import ClusterConfig
from omegaconf import OmegaConf
from safetensors.torch import load_file

from pipeline import distributed
from pipeline.artifacts import read_json
from pipeline.config import validate
from tests.conftest import FAST, GROUPS, compose_with, mlflow_client, pipeline, refused, replace, runs, started

TWO = ["accelerate=ddp", "accelerate.num_processes=2"]
SETTINGS = ["stage=[prepare,train]", "train.precision=fp32", *FAST, "train.eval_batches=2", "train.checkpoint_every=4"]
# Two processes with micro-batches of 4 see the batches of one process with micro-batches of 8;
# only the order of the floating-point reductions differs.
TOLERANCE = 1e-4


@pytest.mark.slow
def test_two_processes_train_one_model_as_one_process_does_with_the_same_global_batch(tmp_path):
    pipeline(tmp_path, *SETTINGS, *TWO, "train.micro_batch_size=4")
    pipeline(tmp_path, *SETTINGS, "train.micro_batch_size=8")
    outputs = {read_json(p / "summary.json")["num_processes"]: p for p in (tmp_path / "artifacts" / "train").iterdir()}
    assert sorted(outputs) == [1, 2]  # one output each, nothing half-written beside them
    two, one = (read_json(outputs[n] / "summary.json") for n in (2, 1))

    # Both ranks trained, and their copies of the model are identical bit for bit.
    assert two["distributed_type"] == "MULTI_CPU"
    assert len(two["replica_sha256"]) == 2 and len(set(two["replica_sha256"])) == 1
    # The same losses, step by step, and the same weights.
    assert [s for s, _ in two["history"]["train_loss"]] == [s for s, _ in one["history"]["train_loss"]]
    for (_, a), (_, b) in zip(two["history"]["train_loss"], one["history"]["train_loss"]):
        assert a == pytest.approx(b, rel=TOLERANCE)
    assert two["heldout_loss"] == pytest.approx(one["heldout_loss"], rel=TOLERANCE)
    # Per tensor, as a norm: Adam turns the reduction-order noise in near-zero gradients into
    # lr-sized steps on a few single elements.
    weights = [load_file(outputs[n] / "model.safetensors") for n in (2, 1)]
    for name, tensor in weights[0].items():
        assert (tensor - weights[1][name]).norm() <= TOLERANCE * weights[1][name].norm(), name

    # One MLflow child run for the two processes, logged by the main process alone.
    (launched,) = [r for r in runs(tmp_path, "train") if r.data.params["accelerate.num_processes"] == "2"]
    assert launched.info.status == "FINISHED" and launched.data.tags["train.compute_dtype"] == "float32"
    losses = mlflow_client(tmp_path).get_metric_history(launched.info.run_id, "train/loss")
    assert sorted(m.step for m in losses) == [s for s, _ in two["history"]["train_loss"]]
    assert not list((tmp_path / "artifacts" / "checkpoints").iterdir())
    assert not (tmp_path / "artifacts" / "metrics-journal").exists()


def _rank_process(parent: psutil.Process, rank: str) -> psutil.Process | None:
    for child in parent.children(recursive=True):
        try:
            if "pipeline.worker" in child.cmdline() and child.environ().get("RANK") == rank:
                return child
        except psutil.Error:
            pass
    return None


@pytest.mark.slow
def test_a_failing_rank_fails_the_stage_with_its_error(tmp_path):
    log = tmp_path / "pipeline.log"
    process = started(tmp_path, *replace(SETTINGS, "train.max_steps=100000", "train.checkpoint_every=2"), *TWO, log=log)
    try:
        deadline = time.monotonic() + 180
        # Once a checkpoint is written, both processes are past their setup and training.
        while not list(tmp_path.glob("artifacts/checkpoints/*/step-*")) and time.monotonic() < deadline:
            time.sleep(0.2)
        rank1 = _rank_process(psutil.Process(process.pid), "1")
        assert rank1 is not None, log.read_text()[-3000:]
        rank1.send_signal(signal.SIGINT)  # a Python exception on that one process
        process.join(timeout=180)
    finally:
        process.kill()
    output = log.read_text()
    assert process.exitcode != 0
    assert "stage train failed on rank 1 of 2: KeyboardInterrupt" in output
    (run,) = runs(tmp_path, "train")
    assert run.info.status == "FAILED" and "rank 1 of 2" in run.data.tags["error"]
    assert not (tmp_path / "artifacts" / "train").exists() or not list((tmp_path / "artifacts" / "train").iterdir())


@pytest.mark.parametrize("option", [o for o in GROUPS["accelerate"] if o != "single"])
def test_launch_configs_are_valid_accelerate_configs(option, tmp_path):
    cfg = compose_with(f"accelerate={option}", "accelerate.num_processes=8", "train.precision=bf16",
                       "train.grad_accum_steps=4", "+accelerate.extra.gpu_ids=all")
    path = tmp_path / "accelerate.yaml"
    OmegaConf.save(OmegaConf.create(distributed.launch_config(cfg)), path)
    config = ClusterConfig.from_yaml_file(path)  # Accelerate's own parser rejects unknown keys
    assert config.distributed_type.value == cfg.accelerate.distributed_type and config.num_processes == 8
    assert config.mixed_precision == "bf16" and config.main_process_port > 0 and config.gpu_ids == "all"
    if option.startswith("deepspeed"):
        assert config.deepspeed_config["gradient_accumulation_steps"] == 4
        assert config.deepspeed_config["zero_stage"] == int(option[-1])


def test_bad_launch_settings_name_what_to_change():
    cfg = compose_with("accelerate.num_processes=4")
    with pytest.raises(ValueError, match="accelerate.num_processes=4 needs a launch config.*accelerate=ddp"):
        distributed.resolve(cfg, ["train"])
    cfg = compose_with(*TWO, "accelerate.machine_rank=1", "accelerate.num_machines=2", "accelerate.main_process_ip=10.0.0.1")
    with pytest.raises(ValueError, match="run only stage=train there"):
        distributed.resolve(cfg, ["prepare", "train"])
    cfg = compose_with(*TWO, "accelerate.num_machines=2")
    with pytest.raises(ValueError, match="accelerate.num_machines=2 needs accelerate.main_process_ip"):
        distributed.resolve(cfg, ["train"])
    cfg = compose_with(*TWO, "accelerate.distributed_type=MEGATRON_LM", "accelerate.num_processes=0")
    with pytest.raises(ValueError, match="'MEGATRON_LM' is not one of NO, MULTI_GPU, FSDP, DEEPSPEED.*num_processes=0 must"):
        validate(cfg)
    if not torch.cuda.is_available():
        cfg = compose_with("accelerate=ddp")
        with pytest.raises(ValueError, match="accelerate.num_processes=null means one process per GPU"):
            distributed.resolve(cfg, ["train"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without GPUs")
def test_sharded_training_without_gpus_is_refused_before_any_work(tmp_path):
    message = refused(tmp_path, "accelerate=fsdp", "accelerate.num_processes=2")
    assert "accelerate.distributed_type=FSDP needs CUDA GPUs" in message and "accelerate=ddp" in message
