"""What only a GPU shows, in one run of at most 8 minutes: the train stage as users run it
(`python -m pipeline`, one process a run) on a Llama of about 0.5B parameters built from a config,
at fp32, bf16, fp16 and fp8 (torchao through Accelerate), then with each QAT format at the precision
`auto` picks, and the quantize stage's AWQ against RTN on the bf16 model.

Per precision: step time, tokens/s and peak GPU memory, each step time and rate with a bootstrap
interval over the timed steps; the compute-dtype probe's verdict, and under fp8 the Linear layers
that ran in fp8. Also `precision=auto`'s choice and reason, and the GPU, driver, torch and CUDA.
A run the hardware or the installation refuses is recorded with its refusal, never as a number.

Tracking goes to the metrics journal (tracking=journal): the GPU machine has no MLflow.

    python benchmarks/gpu/run.py --out DIR [--tiny]

--tiny: the tiny model for a few steps, so that the whole script runs on a CPU in about two
minutes (`make gpu-rehearsal`). Writes DIR/results.json and DIR/results.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pipeline.formats import QAT  # noqa: E402
from pipeline.hardware import PRECISION_TABLE, detect, resolve_precision  # noqa: E402
from pipeline.metrics import percentile_interval  # noqa: E402

# About 0.5B parameters: 16 layers of width 1536 (head size 128), with sequences of 1024 tokens in
# micro-batches of 8, so that the GPU's matmuls, not the Python around them, set the pace.
GPU_MODEL = ["model=tiny", "model.name=llama-0.5b", "model.arch.hidden_size=1536", "model.arch.intermediate_size=4096",
             "model.arch.num_hidden_layers=16", "model.arch.num_attention_heads=12", "model.arch.num_key_value_heads=4",
             "model.arch.vocab_size=16384", "model.arch.max_position_embeddings=1024", "data.seq_len=1024",
             "train.micro_batch_size=8"]
GPU_STEPS, TINY_STEPS = 40, 6
# Steps left out of every timing: the allocator's, cuBLAS's and torchao's first calls.
WARMUP = {"gpu": 8, "tiny": 2}
TINY_MODEL = ["model=tiny", "model.arch.num_hidden_layers=2", "data.seq_len=64", "train.micro_batch_size=4"]
RESAMPLES, CONFIDENCE = 2000, 0.95
PACKAGES = ("torch", "accelerate", "transformers", "torchao", "hydra-core", "llmcompressor", "mlflow")


def settings(out: Path, mode: str) -> list[str]:
    steps = GPU_STEPS if mode == "gpu" else TINY_STEPS
    return [*(GPU_MODEL if mode == "gpu" else TINY_MODEL), "tracking=journal", f"paths.artifacts={out / 'artifacts'}",
            f"train.max_steps={steps}", "train.warmup_steps=1", "train.log_every=1", f"train.eval_every={steps}",
            f"train.checkpoint_every={steps}", "train.eval_batches=1", "quantize.calibration.samples=16",
            "hydra.run.dir=" + str(out / "hydra")]


def pipeline(out: Path, name: str, *overrides: str) -> dict:
    """One `python -m pipeline` run: its status, seconds and, where it refused or failed, the one
    line it printed (all it printed is kept in DIR/logs/<name>.log)."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "pipeline", *overrides], cwd=out, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})
    (logs / f"{name}.log").write_text(result.stdout + result.stderr)
    ran = {"seconds": round(time.perf_counter() - started, 1)}
    if result.returncode:
        lines = [line for line in (result.stderr or result.stdout).splitlines()
                 if line.strip() and not line.startswith("Set the environment variable HYDRA_FULL_ERROR")]
        return {**ran, "status": "refused", "reason": lines[-1] if lines else f"exit status {result.returncode}"}
    return {**ran, "status": "ok"}


def output(out: Path, stage: str, overrides: list[str]) -> Path:
    """The stage's output folder for these settings, by the pipeline's own addressing."""
    from hydra import compose, initialize_config_dir

    from pipeline.artifacts import stage_dir
    from pipeline.config import register

    register()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return stage_dir(compose("config", overrides=[o for o in overrides if not o.startswith("hydra.")]), stage)


def bootstrap(statistic, *samples: np.ndarray) -> list[float]:
    """A percentile interval of statistic(*samples), each sample's steps drawn on their own."""
    rng = np.random.default_rng(0)
    drawn = [statistic(*(x[rng.integers(0, len(x), len(x))] for x in samples)) for _ in range(RESAMPLES)]
    return percentile_interval(drawn, CONFIDENCE)


def step_times(summary: dict, warmup: int) -> np.ndarray:
    return np.array([seconds for step, seconds in summary["history"]["step_time_s"] if step > warmup])


def training(summary: dict, warmup: int) -> dict:
    times = step_times(summary, warmup)
    per_step = summary["tokens"] / summary["steps"]  # plain text, packed: every position a real token
    low, high = bootstrap(np.mean, times)
    return {"step_time_s": float(times.mean()), "step_time_s_ci": [low, high], "timed_steps": len(times),
            "tokens_per_s": per_step / float(times.mean()), "tokens_per_s_ci": [per_step / high, per_step / low],
            "peak_memory_mb": summary["peak_memory_mb"], "compute_dtype": summary["compute_dtype"],
            "expected_compute_dtype": PRECISION_TABLE[summary["precision"]].compute_dtype,
            "fp8_linear_layers": summary.get("fp8_linear_layers"), "heldout_loss": summary["heldout_loss"]}


def ratio(a: np.ndarray, b: np.ndarray) -> dict:
    """mean(a) / mean(b), with its interval."""
    def of_means(x, y):
        return x.mean() / y.mean()

    return {"ratio": float(of_means(a, b)), "ci": bootstrap(of_means, a, b)}


def environment() -> dict:
    import torch

    found = {"hardware": detect().describe(), "python": platform.python_version(), "cuda": torch.version.cuda}
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    if torch.cuda.is_available():
        found["gpu"] = torch.cuda.get_device_name()
        found["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        found["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        if shutil.which("nvidia-smi"):
            found["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                             capture_output=True, text=True).stdout.strip()
    return found


def expectations(runs: dict) -> list[dict]:
    """The field's expectations of these precisions at this size, checked where both sides ran."""
    def measured(precision, key):
        run = runs.get(precision, {})
        return run[key] if run.get("status") == "ok" else None

    checks = [("bf16 tokens/s at least 2x fp32's", "tokens_per_s", "bf16", "fp32", 2.0, "min"),
              ("fp8 tokens/s at least 1.3x bf16's", "tokens_per_s", "fp8", "bf16", 1.3, "min"),
              ("bf16 peak memory at most 0.6x fp32's", "peak_memory_mb", "bf16", "fp32", 0.6, "max")]
    found = []
    for name, key, top, bottom, limit, kind in checks:
        a, b = measured(top, key), measured(bottom, key)
        if a is None or b is None:
            found.append({"expectation": name, "ratio": None, "met": None})
            continue
        value = a / b
        found.append({"expectation": name, "ratio": value, "met": value >= limit if kind == "min" else value <= limit})
    return found


def quantize(out: Path, base: list[str]) -> dict:
    """AWQ against RTN on the bf16-trained model, where llm-compressor is installed: it needs
    `datasets`, whose pyarrow (55 MB) is more than a 64 MiB carry holds with the rest."""
    missing = [m for m in ("llmcompressor", "datasets") if importlib.util.find_spec(m) is None]
    if missing:
        return {"status": "skipped", "reason": f"{' and '.join(missing)} not installed here (too large to carry)"}
    overrides = [*base, "train.precision=bf16", "quantize.methods=[rtn,awq]"]
    run = pipeline(out, "quantize", "stage=quantize", *overrides)
    if run["status"] != "ok":
        return run
    methods = json.loads((output(out, "quantize", overrides) / "summary.json").read_text())["methods"]
    seconds = {m: info["seconds"] for m, info in methods.items()}
    return {**run, "seconds": seconds, "awq_vs_rtn": seconds["awq"] / seconds["rtn"]}



def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [f"GPU benchmark ({results['mode']}), {results['date']}: {env['hardware']}, driver {env.get('driver', '-')}, "
             f"torch {env['torch']} (CUDA {env['cuda']}), {results['seconds']:.0f} s in all.",
             "", f"precision=auto: {results['auto']['choice']} ({results['auto']['reason']})", "",
             "| precision | step time (s) [95% CI] | tokens/s [95% CI] | peak memory (MiB) | compute dtype | fp8 Linear layers |",
             "|---|---|---|---|---|---|"]
    for precision, run in results["train"].items():
        if run["status"] != "ok":
            lines.append(f"| {precision} | refused: {run['reason']} | | | | |")
            continue
        s, t = run["step_time_s_ci"], run["tokens_per_s_ci"]
        lines.append(f"| {precision} | {run['step_time_s']:.4f} [{s[0]:.4f}, {s[1]:.4f}] | {run['tokens_per_s']:,.0f} "
                     f"[{t[0]:,.0f}, {t[1]:,.0f}] | {run['peak_memory_mb']:,.0f} | {run['compute_dtype']} "
                     f"(expected {run['expected_compute_dtype']}) | {run['fp8_linear_layers'] if run['fp8_linear_layers'] is not None else '-'} |")
    scope = "" if results["mode"] == "gpu" else " (a GPU's: on this rehearsal's tiny model and CPU they do not apply)"
    lines += ["", f"Expectations{scope}:", "", "| expectation | measured | met |", "|---|---|---|"]
    for check in results["expectations"]:
        measured = "not measured" if check["ratio"] is None else f"x{check['ratio']:.2f}"
        lines.append(f"| {check['expectation']} | {measured} | {'-' if check['met'] is None else 'yes' if check['met'] else 'NO'} |")
    lines += ["", f"QAT at {results['auto']['choice']} (step time against the plain run's):", ""]
    for arm, run in results["qat"].items():
        lines.append(f"- {arm}: " + (f"x{run['ratio']:.3f} [{run['ci'][0]:.3f}, {run['ci'][1]:.3f}]" if "ratio" in run
                                     else f"refused: {run['reason']}"))
    q = results["quantize"]
    lines += ["", "Quantize on the bf16 model: " + (", ".join(f"{m} {s:.1f} s" for m, s in q["seconds"].items()) +
                                                   (f" (AWQ x{q['awq_vs_rtn']:.1f} RTN)" if "awq_vs_rtn" in q else "")
                                                   if q["status"] == "ok" else f"skipped: {q['reason']}")]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="the tiny model for a few steps (a CPU rehearsal)")
    args = parser.parse_args()
    out, mode = args.out.resolve(), "tiny" if args.tiny else "gpu"
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    base = settings(out, mode)
    choice, reason = resolve_precision("auto", detect())
    results = {"mode": mode, "date": time.strftime("%Y-%m-%d"), "environment": environment(),
               "auto": {"choice": choice, "reason": reason}, "train": {}, "qat": {}}
    print(f"precision=auto: {choice} ({reason})", flush=True)

    prepared = pipeline(out, "prepare", "stage=prepare", *base)
    if prepared["status"] != "ok":
        raise SystemExit(f"prepare failed: {prepared['reason']}")
    times = {}
    for precision in PRECISION_TABLE:
        overrides = [*base, f"train.precision={precision}"]
        run = pipeline(out, f"train-{precision}", "stage=train", *overrides)
        if run["status"] == "ok":
            summary = json.loads((output(out, "train", overrides) / "summary.json").read_text())
            run.update(training(summary, WARMUP[mode]))
            times[precision] = step_times(summary, WARMUP[mode])
        results["train"][precision] = run
        print(f"train {precision}: " + (f"{run['tokens_per_s']:,.0f} tokens/s, {run['peak_memory_mb']:,.0f} MiB peak"
                                        if run["status"] == "ok" else f"refused: {run['reason']}"), flush=True)

    for arm in QAT:
        overrides = [*base, f"train.precision={choice}", f"train.qat={arm}"]
        run = pipeline(out, f"train-{choice}-qat-{arm}", "stage=train", *overrides)
        if run["status"] == "ok" and choice in times:
            summary = json.loads((output(out, "train", overrides) / "summary.json").read_text())
            run.update(ratio(step_times(summary, WARMUP[mode]), times[choice]))
        results["qat"][arm] = run
        print(f"qat {arm}: " + (f"x{run['ratio']:.3f} step time" if "ratio" in run else f"refused: {run.get('reason')}"),
              flush=True)

    results["quantize"] = quantize(out, base)
    results["expectations"] = expectations(results["train"])
    results["seconds"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
