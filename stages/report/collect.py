"""What the report reads: each training run's summary, evaluation and serving numbers, as one row,
from the stage outputs of otherwise identical settings or from MLflow runs."""

from __future__ import annotations

import tempfile
from pathlib import Path

from omegaconf import DictConfig

from pipeline.artifacts import read_json, stage_dir, variant, verify_stage_output
from pipeline.contract import declared

# Serving figures a row's cells carry (at report.serve_level), each with its interval.
SERVED = ("output_tokens_per_s", "ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50")
# The evaluate stage's file of the starting weights' grid effect.
GRID_EFFECT = declared("evaluate").names["grid_effect"]
# What served each format, as the report names it.
ENGINE_NAMES = {"llamacpp": "llama-server", "vllm": "vLLM", "external": "the endpoint"}


def column(name: str) -> str:
    """One column for the 16-bit base GGUF file whatever its type (f16 after fp32 training, bf16 after bf16)."""
    source, _, kind = name.rpartition(".")
    return f"{source}.16bit" if kind in ("f16", "bf16") else name


def assemble(train: dict, evaluation: dict | None, per_sequence: dict | None, serving: dict | None, level: str,
             grid: dict | None = None) -> dict:
    """One training run's row: its training summary and, per deployed format, what was measured
    (served figures with their intervals, and each round's per-request values they rest on), and
    the starting weights' grid effect where the evaluation measured it."""
    row = {"train": train, "artifacts": {}, "sequence_nll": {}, "sequence_tokens": []}
    if grid:
        row["grid_effect"] = grid
    if evaluation:
        row["artifacts"] = {column(n): dict(v) for n, v in evaluation.items()}
    if per_sequence:
        row["sequence_nll"] = {column(n): v for n, v in per_sequence["nll"].items()}
        row["sequence_tokens"] = per_sequence["tokens"]
        row["scored"] = per_sequence.get("scored", "all tokens")
        if per_sequence.get("references"):  # the trained model and its references on every held-out sequence
            row["reference_pairs"] = per_sequence["references"]
    for name, result in (serving or {}).get("results", {}).items():
        measured = result.get("levels", {}).get(level)
        if result["status"] == "ok" and measured and column(name) in row["artifacts"]:
            cell = row["artifacts"][column(name)]
            cell.update({k: measured[k] for key in SERVED for k in (key, f"{key}_ci") if k in measured})
            cell["served_by"] = ENGINE_NAMES[result.get("engine", serving.get("engine"))]
            if "quality" in result:  # held-out tokens scored through the server against the checkpoint
                cell["served_perplexity_ratio"] = result["quality"]["perplexity_ratio"]
            if "rounds" in measured:
                cell["speed_rounds"] = measured["rounds"]
    return row


def _json_or_none(path: Path):
    return read_json(path) if path.exists() else None


def collect(cfg: DictConfig, changes: dict) -> dict | None:
    """The row of the run with these settings changed, or None if it was never trained."""
    run = variant(cfg, changes)
    train = stage_dir(run, "train") / "summary.json"
    if not train.exists():
        return None
    for stage in ("train", "evaluate", "serve"):  # a file changed since is never a number in the report
        if stage_dir(run, stage).is_dir():
            verify_stage_output(run, stage)
    evaluation, serving = stage_dir(run, "evaluate"), stage_dir(run, "serve")
    return assemble(read_json(train), _json_or_none(evaluation / "summary.json"),
                    _json_or_none(evaluation / "per_sequence.json"), _json_or_none(serving / "summary.json"),
                    cfg.report.serve_level, _json_or_none(evaluation / GRID_EFFECT))


def collect_runs(client, run_ids: list[str], level: str) -> tuple[dict, dict | None, list[int]]:
    """Rows from MLflow pipeline (parent) runs, wherever they ran, read from the artifacts their
    stages logged. The first fp32 run is the baseline; a later fp32 run with another seed is the
    noise floor. Returns (rows, noise row or None, [baseline seed, noise seed])."""
    rows, noise, seeds = {}, None, []
    with tempfile.TemporaryDirectory() as tmp:
        def artifact(stage_runs: dict, stage: str, path: str):
            if stage not in stage_runs:
                return None
            run_id = stage_runs[stage].info.run_id
            folder, _, name = path.rpartition("/")
            if name not in {Path(a.path).name for a in client.list_artifacts(run_id, folder or None)}:
                return None
            return read_json(client.download_artifacts(run_id, path, tempfile.mkdtemp(dir=tmp)))

        for run_id in run_ids:
            parent = client.get_run(run_id)
            precision, seed = parent.data.params["train.precision"], int(parent.data.params["seed"])
            children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
            by_stage = {c.data.tags.get("stage"): c for c in children}
            train = artifact(by_stage, "train", "summary.json")
            if train is None:
                raise ValueError(f"report.runs: MLflow run {run_id} has no train stage summary.")
            row = assemble(train, artifact(by_stage, "evaluate", "evaluation/summary.json"),
                           artifact(by_stage, "evaluate", "evaluation/per_sequence.json"),
                           artifact(by_stage, "serve", "serve/summary.json"), level,
                           artifact(by_stage, "evaluate", f"evaluation/{GRID_EFFECT}"))
            if precision not in rows:
                rows[precision] = row
                seeds += [seed] if precision == "fp32" else []
            elif precision == "fp32" and noise is None and seed != seeds[0]:
                noise, seeds = row, [seeds[0], seed]
    return rows, noise, seeds


def add_ratios(rows: dict) -> None:
    """Cell values the gates read: the ratio to the fp32 row, and the fp32 row's own KL as its
    distance from the fp32-trained model."""
    fp32 = rows.get("fp32", {}).get("artifacts", {})
    for precision, row in rows.items():
        for name, cell in row["artifacts"].items():
            if name in fp32 and "perplexity" in cell:
                cell["perplexity_ratio_to_fp32"] = cell["perplexity"] / fp32[name]["perplexity"]
            if precision == "fp32" and "kl" in cell:
                cell["kl_vs_fp32"], cell["kl_vs_fp32_ci"] = cell["kl"], cell["kl_ci"]
