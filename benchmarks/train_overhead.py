"""The train stage's step time against a minimal hand-written torch.autocast loop.

Same model, data, batches, optimizer, schedule, clipping and precision, in the same process:
hand loop, pipeline, hand loop again (the baseline is the mean of the two, which cancels slow
drift of the machine). Prints the ratio pipeline / hand per precision; the target is <= 1.03.

    python benchmarks/train_overhead.py [--precision fp32 bf16] [--steps 40]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.artifacts import stage_dir  # noqa: E402
from pipeline.config import register  # noqa: E402
from pipeline.data import load_blocks  # noqa: E402
from pipeline.runner import run  # noqa: E402
from stages.train import batch_at, build_model, lr_lambda, warmup_steps  # noqa: E402

register()  # the typed schemas the config groups build on
WARMUP = 5  # steps left out of every timing (allocator and kernel warm-up)
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def config(workdir: Path, precision: str, steps: int, stage: str = "train"):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[
            f"stage={stage}", f"train.precision={precision}", f"train.max_steps={steps}",
            "train.log_every=1", f"train.eval_every={steps}", f"train.checkpoint_every={steps}",
            "train.eval_batches=1", "tracking.log_model=false",
            f"tracking.uri=sqlite:///{workdir}/mlflow.db", f"tracking.artifact_location={workdir}/mlruns",
            f"paths.artifacts={workdir}/artifacts",
        ])


def hand_loop(cfg, steps: int) -> float:
    """Median seconds per step of the plainest correct loop for this precision."""
    from transformers import AutoTokenizer

    t = cfg.train
    prepared = stage_dir(cfg, "prepare")
    blocks = load_blocks(prepared, "train", cfg.data.seq_len)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, AutoTokenizer.from_pretrained(prepared / "tokenizer"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_lambda, warmup=warmup_steps(t), total=t.max_steps, min_ratio=t.min_lr_ratio))
    dtype = DTYPES[t.precision]
    scaler = torch.amp.GradScaler("cpu", init_scale=t.init_loss_scale, enabled=dtype is torch.float16)
    times = []
    for step in range(steps):
        start = time.perf_counter()
        batch = batch_at(blocks, step, t.micro_batch_size, cfg.seed)
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model(input_ids=batch, labels=batch).loss
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        scheduler.step()
        loss.item()
        times.append(time.perf_counter() - start)
    return statistics.median(times[WARMUP:])


def pipeline_loop(cfg) -> float:
    """Median seconds per step the train stage itself measured and logged."""
    run(cfg)
    client = MlflowClient(cfg.tracking.uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    (train,) = client.search_runs([experiment.experiment_id], "attributes.run_name = 'train'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
    history = sorted(client.get_metric_history(train.info.run_id, "train/step_time_s"), key=lambda m: m.step)
    return statistics.median(m.value for m in history[WARMUP:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for precision in args.precision:
            cfg = config(Path(tmp), precision, args.steps)
            torch.set_num_threads(cfg.train.threads or torch.get_num_threads())
            run(config(Path(tmp), precision, args.steps, stage="prepare"))
            before = hand_loop(cfg, args.steps)
            ours = pipeline_loop(cfg)
            hand = statistics.mean([before, hand_loop(cfg, args.steps)])
            rows.append((precision, hand, ours, ours / hand))

    print(f"\n{'precision':<10}{'hand ms/step':>14}{'pipeline ms/step':>18}{'ratio':>8}   (target <= 1.03)")
    for precision, hand, ours, ratio in rows:
        print(f"{precision:<10}{hand * 1e3:>14.1f}{ours * 1e3:>18.1f}{ratio:>8.3f}")


if __name__ == "__main__":
    main()
