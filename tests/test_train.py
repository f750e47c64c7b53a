"""train: real Accelerate runs of the tiny model on the CPU, read back from MLflow and disk."""

import json
import math
import time

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open

from pipeline.artifacts import read_json, sha256_file
from stages.train import batch_at, lr_lambda, warmup_steps
from tests.conftest import FAST, mlflow_client, only_dir, pipeline, refused, runs, started

PREP_AND_TRAIN = "stage=[prepare,train]"


def metric_values(client, run, key):
    return [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]


def saved_tensors(model_dir):
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.slow
def test_fp32_trains_and_logs_everything(run_pipeline, tmp_path):
    run_pipeline(PREP_AND_TRAIN, "train.precision=fp32", *FAST, "train.max_steps=12", "tracking.log_model=true")
    client = mlflow_client(tmp_path)
    (parent,) = runs(tmp_path, "tiny-fp32")
    (train,) = runs(tmp_path, "train")
    (prepare,) = runs(tmp_path, "prepare")
    assert train.data.tags["mlflow.parentRunId"] == parent.info.run_id == prepare.data.tags["mlflow.parentRunId"]
    assert {r.info.status for r in (parent, train, prepare)} == {"FINISHED"}

    losses = metric_values(client, train, "train/loss")
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.5  # logged every 2 of 12 steps, and it learns
    # Before the first step (where the model starts), then every 4 of 12 steps.
    assert [m.step for m in sorted(client.get_metric_history(train.info.run_id, "eval/loss"), key=lambda m: m.step)] == [0, 4, 8, 12]
    for key in ("train/tokens_per_s", "train/step_time_s", "train/peak_memory_mb", "eval/perplexity"):
        assert all(v > 0 for v in metric_values(client, train, key)), key

    params = train.data.params
    assert params["train.precision"] == "fp32" and params["model.arch.hidden_size"] == "256"
    assert json.loads(params["train.betas"]) == [0.9, 0.95]
    tags = parent.data.tags
    for key in ("git.commit", "git.dirty", "version.torch", "version.transformers", "version.accelerate",
                "version.python", "hardware.cpu", "hardware.cpu_flags", "data_hash", "precision.reason"):
        assert tags.get(key), key
    assert train.data.tags["train.compute_dtype"] == "float32"

    artifacts = {a.path for a in client.list_artifacts(train.info.run_id)}
    assert {"model", "summary.json"} <= artifacts
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        a.path.split("/")[-1] for a in client.list_artifacts(train.info.run_id, "model")}
    assert {"resolved_config.yaml", "environment.txt"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}

    out = only_dir(tmp_path / "artifacts" / "train")
    assert {str(t.dtype) for t in saved_tensors(out).values()} == {"torch.float32"}
    summary = read_json(out / "summary.json")
    assert summary["compute_dtype"] == "float32" and summary["skipped_steps"] == 0
    assert not any((tmp_path / "artifacts" / "checkpoints").glob("*/step-*"))  # cleaned after success


@pytest.mark.slow
def test_bf16_computes_in_bf16(run_pipeline, tmp_path):
    run_pipeline(PREP_AND_TRAIN, "train.precision=bf16", *FAST)
    (train,) = runs(tmp_path, "train")
    assert train.data.tags["train.compute_dtype"] == "bfloat16"
    assert "train/loss_scale" not in train.data.metrics  # no loss scaling in bf16
    out = only_dir(tmp_path / "artifacts" / "train")
    assert {str(t.dtype) for t in saved_tensors(out).values()} == {"torch.float32"}  # fp32 masters


@pytest.mark.slow
def test_fp16_really_runs_fp16_with_loss_scaling(run_pipeline, tmp_path):
    # Accelerate alone would silently train this in fp32 on a CPU.
    run_pipeline(PREP_AND_TRAIN, "train.precision=fp16", *FAST, "train.max_steps=3", "train.micro_batch_size=4",
                 "train.init_loss_scale=1e30")
    client = mlflow_client(tmp_path)
    (train,) = runs(tmp_path, "train")
    assert train.data.tags["train.compute_dtype"] == "float16"
    scales = metric_values(client, train, "train/loss_scale")
    # a 1e30 scale overflows fp16 at once: the scaler skips those steps and backs off
    assert scales and scales[-1] < 1e30
    summary = read_json(only_dir(tmp_path / "artifacts" / "train") / "summary.json")
    assert summary["skipped_steps"] >= 1 and summary["compute_dtype"] == "float16"
    assert train.data.metrics["train/skipped_steps"] == summary["skipped_steps"]


@pytest.mark.slow
def test_auto_decides_from_the_cpu_and_says_why(run_pipeline, tmp_path):
    from pipeline.hardware import CPU_BF16_FLAGS, detect

    hw = detect()
    expected = "bf16" if any(f in hw.cpu_flags for f in CPU_BF16_FLAGS) else "fp32"
    run_pipeline("stage=prepare", "train.precision=auto")
    (parent,) = runs(tmp_path, f"tiny-{expected}")
    assert parent.data.tags["precision.requested"] == "auto"
    assert parent.data.params["train.precision"] == expected
    assert hw.cpu_model in parent.data.tags["precision.reason"]
    assert ("no native bf16" in parent.data.tags["precision.reason"]) == (expected == "fp32")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without GPUs")
def test_fp8_on_cpu_is_refused_before_any_work(tmp_path):
    message = refused(tmp_path, "train.precision=fp8")
    assert "fp8 needs a GPU of compute capability 8.9" in message and "Valid here: fp32, bf16, fp16, auto" in message


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    settings = [PREP_AND_TRAIN, "train.precision=fp32", *FAST, "train.max_steps=16", "train.checkpoint_every=4"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    straight.mkdir(), broken.mkdir()
    pipeline(straight, *settings)

    pipeline(broken, "stage=prepare")
    proc = started(broken, *settings[1:], "stage=train", log=tmp_path / "broken.log")
    deadline = time.time() + 300
    while not list(broken.glob("artifacts/checkpoints/*/step-000008/trainer_state.json")):
        assert proc.is_alive() and time.time() < deadline, "training ended before it could be interrupted"
        time.sleep(0.05)
    proc.kill()
    proc.join()
    assert not (broken / "artifacts" / "train").exists()

    pipeline(broken, *settings[1:], "stage=train", "train.resume=true")
    a = read_json(only_dir(straight / "artifacts" / "train") / "summary.json")
    b = read_json(only_dir(broken / "artifacts" / "train") / "summary.json")
    assert b["resumed_from_step"] >= 8 and a["resumed_from_step"] == 0
    assert b["heldout_loss"] == pytest.approx(a["heldout_loss"], rel=1e-6)
    wa, wb = saved_tensors(only_dir(straight / "artifacts" / "train")), saved_tensors(only_dir(broken / "artifacts" / "train"))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5


@pytest.mark.slow
def test_same_seed_same_weights_and_the_logged_config_redoes_the_run(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    pipeline(first, PREP_AND_TRAIN, "train.precision=fp32", *FAST, "seed=7")
    model = only_dir(first / "artifacts" / "train") / "model.safetensors"
    digest, loss = sha256_file(model), read_json(model.parent / "summary.json")["heldout_loss"]

    # Redo from nothing but what the run recorded: its resolved config.
    (parent,) = runs(first, "tiny-fp32")
    config_dir = mlflow_client(first).download_artifacts(parent.info.run_id, "resolved_config.yaml", str(second))
    pipeline(second, "--config-dir", str(second), "--config-name", "resolved_config")
    redo = only_dir(second / "artifacts" / "train") / "model.safetensors"
    assert redo.parent.name == model.parent.name  # same settings, same key
    assert sha256_file(redo) == digest
    assert read_json(redo.parent / "summary.json")["heldout_loss"] == loss
    assert config_dir.endswith("resolved_config.yaml")


@pytest.mark.slow
def test_multirun_of_two_precisions_keeps_both(run_pipeline, tmp_path):
    run_pipeline(PREP_AND_TRAIN, "train.precision=fp32,bf16", *FAST, "train.max_steps=4", multirun=True)
    trains = runs(tmp_path, "train")
    assert sorted(r.data.params["train.precision"] for r in trains) == ["bf16", "fp32"]
    assert len({r.data.tags["mlflow.parentRunId"] for r in trains}) == 2
    assert sorted(p.name.split("-")[1] for p in (tmp_path / "artifacts" / "train").iterdir()) == ["bf16", "fp32"]
    parents = [runs(tmp_path, n)[0] for n in ("tiny-fp32", "tiny-bf16")]
    assert {p.data.tags["hydra.job_num"] for p in parents} == {"0", "1"}


@pytest.fixture
def local_checkpoint(tmp_path):
    """A small pretrained-style checkpoint directory: weights, config and tokenizer, as users have."""
    from pydoc_data.topics import topics
    from transformers import LlamaConfig, LlamaForCausalLM

    from stages.prepare import train_tokenizer

    tokenizer = train_tokenizer(list(topics.values()), 512)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=512, eos_token_id=tokenizer.eos_token_id)
    path = tmp_path / "checkpoint"
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.slow
def test_hf_checkpoint_fine_tunes_with_lora_merged(run_pipeline, tmp_path, local_checkpoint):
    run_pipeline(PREP_AND_TRAIN, "model=hf", f"model.name_or_path={local_checkpoint}", "model.lora.enabled=true",
                 "train.precision=fp32", *FAST, "train.lr=1e-2")
    prepared = only_dir(tmp_path / "artifacts" / "prepare")
    assert read_json(prepared / "manifest.json")["tokenizer_source"] == str(local_checkpoint)
    out = only_dir(tmp_path / "artifacts" / "train")
    tuned, base = saved_tensors(out), saved_tensors(local_checkpoint)
    assert set(tuned) == set(base)  # LoRA merged away: a plain checkpoint again
    assert not torch.equal(tuned["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(tuned["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
    # The adapter as trained, saved before the merge, is measured against the merged model: the
    # first step of the report's waterfall, which merging in fp32 makes all but free.
    assert read_json(out / "adapter" / "adapter_config.json")["base_model_name_or_path"] == str(local_checkpoint)
    run_pipeline("stage=[quantize,evaluate,report]", "model=hf", f"model.name_or_path={local_checkpoint}",
                 "model.lora.enabled=true", "train.precision=fp32", *FAST, "train.lr=1e-2", "quantize.methods=[rtn]",
                 "quantize.group_size=32")
    measured = read_json(only_dir(tmp_path / "artifacts" / "evaluate") / "summary.json")
    assert abs(measured["lora"]["kl"]) < 1e-6 and measured["lora"]["tokens"] == measured["trained"]["tokens"]
    report = read_json(only_dir(tmp_path / "artifacts" / "report") / "report.json")
    steps = [step["step"] for step in report["waterfall"]["fp32"]["rtn"]]
    assert steps == ["LoRA merge", "RTN (4-bit)"] and "lora" not in report["columns"]


@pytest.mark.slow
def test_nan_loss_stops_with_a_clear_message(run_pipeline, tmp_path, local_checkpoint):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(local_checkpoint)
    with torch.no_grad():
        model.model.norm.weight.fill_(math.nan)
    model.save_pretrained(local_checkpoint)
    result = run_pipeline(PREP_AND_TRAIN, "model=hf", f"model.name_or_path={local_checkpoint}",
                          "train.precision=fp32", *FAST, check=False)
    assert result.returncode != 0 and "Loss became nan at step 0" in result.stderr
    (train,) = runs(tmp_path, "train")
    assert train.info.status == "FAILED" and "Loss became nan" in train.data.tags["error"]
    assert not (tmp_path / "artifacts" / "train").exists()


def test_lr_schedule_warms_up_then_decays_to_its_floor():
    lrs = [lr_lambda(step, warmup=4, total=20, min_ratio=0.1) for step in range(21)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0] and lrs[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and lrs[20] == pytest.approx(0.1)


def test_warmup_is_a_share_of_the_steps_unless_counted_in_steps():
    t = OmegaConf.create({"warmup_ratio": 0.03, "warmup_steps": None, "max_steps": 300})
    assert warmup_steps(t) == 9
    t.max_steps = 10  # a short run still warms up, for one step, where 10 counted steps would refuse it
    assert warmup_steps(t) == 1
    t.warmup_steps = 4
    assert warmup_steps(t) == 4


def test_batch_order_covers_each_epoch_and_splits_across_processes_exactly():
    blocks = torch.arange(24).unsqueeze(1)  # block i holds the number i
    epoch = torch.cat([batch_at(blocks, i, 4, seed=3) for i in range(6)]).flatten().tolist()
    assert sorted(epoch) == list(range(24)) and epoch != list(range(24))  # every block once, shuffled
    assert batch_at(blocks, 6, 4, seed=3).flatten().tolist() != epoch[:4]  # the next epoch reshuffles
    assert torch.equal(batch_at(blocks, 2, 4, seed=3), batch_at(blocks, 2, 4, seed=3))  # a pure function
    for index in range(8):  # two processes with batch 2 see one process's batch of 4
        shares = [batch_at(blocks, index, 2, seed=3, rank=r, world=2) for r in range(2)]
        assert torch.equal(torch.cat(shares), batch_at(blocks, index, 4, seed=3))
