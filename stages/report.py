"""report: which training precision to use, and what each deployed format costs, in words first.

Collects, for every precision in report.precisions, what the other stages wrote for otherwise
identical settings (a Hydra sweep, the DVC matrix and single runs all leave them in the same
places), plus the fp32 noise-floor run (the same settings at report.noise_seed, measured against
the main seed's fp32 model) where it exists. Only what was measured is shown: a precision that was
not run gets one "not run" line, never a cell, bar or point.

- One precision: each deployed format against the run's own trained model (perplexity ratio with
  a paired interval, KL, top-1), its size and serving speed, and the fastest format per KL budget.
- Several: each precision's training cost against fp32's, its deployed perplexity against the
  fp32-trained model's at the same format (paired bootstrap over the same held-out sequences),
  judged against the seed-to-seed difference of two fp32 runs, and a recommendation by the rule
  that RULE states, or the reason there is none and what to run to get one.

Outputs: report.md and report.html (self-contained, plots embedded), the plots as PNG files,
report.json (every number, the data behind every plot and table cell, each with its source),
metrics.json (flat, for `dvc metrics`), gates.json.
"""

from __future__ import annotations

import base64
import html
import logging
import math
import re
import tempfile
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from pipeline.artifacts import atomic_dir, read_json, stage_dir, variant, write_json
from pipeline.hardware import PRECISIONS
from pipeline.metrics import bootstrap_ci
from pipeline.contract import PipelineError, Stage

# It reads every precision's outputs, beyond its own address, so it always runs (in seconds).
STAGE = Stage("report", settings=("report",), reads=("train", "evaluate", "serve"), scope="sweep", reusable=False)

log = logging.getLogger(__name__)

GATE_METRICS = ("perplexity", "kl", "kl_vs_fp32", "top1", "perplexity_ratio_to_fp32", "size_mb",
                "ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50", "output_tokens_per_s")
# Training cost: summary key, how it reads, and its name in a ratio to fp32's.
COSTS = (("step_time_s", "training step {} s", "step time"), ("tokens_per_s", "{} tokens/s", "tokens/s"),
         ("peak_memory_mb", "peak memory {} MB", "peak memory"))
SERVED = ("output_tokens_per_s", "ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50")
NOISE = "noise"  # the fp32 run at report.noise_seed
COLOURS = {"fp32": "tab:blue", "bf16": "tab:orange", "fp16": "tab:green", "fp8": "tab:red", NOISE: "tab:gray"}
MARKERS = "osD^vP*X<>hp"
TITLES = {"loss_curves": "Loss per training precision", "quality_vs_throughput": "Quality against served throughput",
          "perplexity_by_format": "Held-out perplexity per deployed format",
          "kl_vs_fp32": "Divergence from the fp32-trained model, beside two fp32 seeds'"}
RULE = ("Rule: a training precision passes at a deployed format when its held-out perplexity there is not "
        "significantly higher than the fp32-trained model's at the same format: the {level} paired-bootstrap interval "
        "of the ratio (same held-out sequences) does not lie wholly above 1 + the seed-to-seed difference of two "
        "fp32 runs at that format (0 where that was not measured). The recommendation is the passing precision with "
        "the lowest measured training step time that passes at every format.")


class GateError(PipelineError):
    """A measured value broke a configured quality gate."""


def check(cfg: DictConfig) -> None:
    r = cfg.report
    if r.noise_seed == cfg.seed:
        raise ValueError(f"report.noise_seed={r.noise_seed} equals seed={cfg.seed}: the noise floor needs a second "
                         f"fp32 run with another seed, e.g. report.noise_seed={cfg.seed + 1}.")
    if not all(b > 0 for b in r.kl_budgets):
        raise ValueError(f"report.kl_budgets={list(r.kl_budgets)} must be positive.")
    for gate in r.gates:
        if gate.get("metric") not in GATE_METRICS or ("max" not in gate and "min" not in gate) or "artifact" not in gate:
            raise ValueError(f"report.gates: {dict(gate)} needs artifact, metric (one of {', '.join(GATE_METRICS)}) "
                             "and max or min.")


def column(name: str) -> str:
    """One column for the 16-bit base GGUF file whatever its type (f16 after fp32 training, bf16 after bf16)."""
    source, _, kind = name.rpartition(".")
    return f"{source}.16bit" if kind in ("f16", "bf16") else name


def assemble(train: dict, evaluation: dict | None, per_sequence: dict | None, serving: dict | None, level: str) -> dict:
    """One training run's row: its training summary and, per deployed format, what was measured."""
    row = {"train": train, "artifacts": {}, "sequence_nll": {}, "sequence_tokens": []}
    if evaluation:
        row["artifacts"] = {column(n): dict(v) for n, v in evaluation.items()}
    if per_sequence:
        row["sequence_nll"] = {column(n): v for n, v in per_sequence["nll"].items()}
        row["sequence_tokens"] = per_sequence["tokens"]
        row["scored"] = per_sequence.get("scored", "all tokens")
    for name, result in (serving or {}).get("results", {}).items():
        measured = result.get("levels", {}).get(level)
        if result["status"] == "ok" and measured and column(name) in row["artifacts"]:
            row["artifacts"][column(name)].update({k: measured[k] for k in SERVED if k in measured})
    return row


def _json_or_none(path: Path):
    return read_json(path) if path.exists() else None


def collect(cfg: DictConfig, changes: dict) -> dict | None:
    """The row of the run with these settings changed, or None if it was never trained."""
    run = variant(cfg, changes)
    train = stage_dir(run, "train") / "summary.json"
    if not train.exists():
        return None
    evaluation, serving = stage_dir(run, "evaluate"), stage_dir(run, "serve")
    return assemble(read_json(train), _json_or_none(evaluation / "summary.json"),
                    _json_or_none(evaluation / "per_sequence.json"), _json_or_none(serving / "summary.json"),
                    cfg.report.serve_level)


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
                           artifact(by_stage, "serve", "serve/summary.json"), level)
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


def paired_ratio(a: dict, a_name: str, b: dict, b_name: str, resamples: int, confidence: float) -> dict | None:
    """Perplexity of a's artifact over b's, with a bootstrap interval that resamples the held-out
    sequences both were measured on (pairing removes most of the sequence-to-sequence spread)."""
    nll_a, nll_b = a["sequence_nll"].get(a_name), b["sequence_nll"].get(b_name)
    if nll_a is None or nll_b is None or a["sequence_tokens"] != b["sequence_tokens"]:
        return None
    diff, tokens = np.asarray(nll_a) - np.asarray(nll_b), np.asarray(a["sequence_tokens"], dtype=float)
    return {"ratio": float(np.exp(diff.sum() / tokens.sum())),
            "ratio_ci": list(bootstrap_ci(diff, tokens, resamples, confidence, transform=np.exp))}


def verdict(comparison: dict, noise: float) -> str:
    low, high = comparison["ratio_ci"]
    if low > 1 + noise:
        return "worse"
    if high < 1 - noise:
        return "better"
    return "no significant difference"


def compare(rows: dict, noise: dict | None, columns: list[str], resamples: int, confidence: float) -> dict:
    """Paired perplexity ratios: each format against the same run's trained model ("own"), each
    precision against fp32 at the same format ("vs_fp32", with a verdict), and the noise run
    against fp32 ("noise")."""
    out = {"own": {}, "vs_fp32": {}, "noise": {}}
    for precision, row in rows.items():
        own = {n: paired_ratio(row, n, row, "trained", resamples, confidence) for n in columns if n != "trained"}
        out["own"][precision] = {n: c for n, c in own.items() if c}
    fp32 = rows.get("fp32")
    if fp32 is None:
        return out
    if noise is not None:
        found = {n: paired_ratio(noise, n, fp32, n, resamples, confidence) for n in columns}
        out["noise"] = {n: c for n, c in found.items() if c}
    for precision, row in rows.items():
        if precision == "fp32":
            continue
        out["vs_fp32"][precision] = {}
        for name in columns:
            found = paired_ratio(row, name, fp32, name, resamples, confidence)
            if found:
                floor = abs(out["noise"][name]["ratio"] - 1) if name in out["noise"] else 0.0
                out["vs_fp32"][precision][name] = {**found, "noise": floor, "verdict": verdict(found, floor)}
    return out


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points no other point beats on both throughput (higher) and the quality loss (lower)."""
    front = [p for p in points if not any(q[0] >= p[0] and q[1] <= p[1] and q != p for q in points)]
    return sorted(set(front))


def fastest_within(row: dict, budget: float) -> tuple[str, dict] | None:
    """The served format with the highest throughput whose KL from its own trained model is within budget."""
    served = [(n, c) for n, c in row["artifacts"].items() if c.get("output_tokens_per_s") and c.get("kl") is not None]
    fitting = [(n, c) for n, c in served if c["kl"] <= budget]
    return max(fitting, key=lambda nc: nc[1]["output_tokens_per_s"]) if fitting else None


def fmt(value) -> str:
    if isinstance(value, int) or not isinstance(value, float):
        return str(value)
    if abs(value) < 1e-2 and value != 0:
        return f"{value:.2e}"
    return f"{value:.{0 if abs(value) >= 1000 else 1 if abs(value) >= 100 else 3}f}"


def interval(ci) -> str:
    return f" [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else ""


def ordered(precisions) -> list[str]:
    return sorted(precisions, key=PRECISIONS.index)


def decide(rows: dict, comparisons: dict, r: DictConfig, cfg: DictConfig) -> dict:
    """The recommendation, or why there is none and what to run; every reason names its numbers."""
    sweep = f"python -m pipeline -m train.precision={','.join(ordered(set(r.precisions) | {'fp32'}))} stage=all"
    noise_run = (f"python -m pipeline 'stage=[train,quantize,export,evaluate]' train.precision=fp32 seed={r.noise_seed} "
                 f"evaluate.reference_seed={cfg.seed}")
    if len(rows) == 1:
        return {"status": "none", "reasons": [f"only {next(iter(rows))} was run with these settings. `{sweep}` adds "
                                              "the cross-precision comparison, and `make compare` runs it with the fp32 "
                                              "noise floor through DVC."]}
    if "fp32" not in rows:
        return {"status": "none", "reasons": [f"there is no fp32-trained model to compare against: run `{sweep}` "
                                              "(or `make compare`)."]}
    sequences = len(rows["fp32"]["sequence_tokens"])
    reasons = []
    if 0 < sequences < r.min_sequences:
        reasons.append(f"only {sequences} held-out sequences were evaluated (report.min_sequences={r.min_sequences}): "
                       f"raise evaluate.max_sequences to at least {r.min_sequences}.")
    wide = [f"{p} at {n} ({fmt(c['ratio_ci'][0])}-{fmt(c['ratio_ci'][1])})" for p, by in comparisons["vs_fp32"].items()
            for n, c in by.items() if c["ratio_ci"][1] - c["ratio_ci"][0] > r.max_interval_width]
    if wide:
        reasons.append(f"the perplexity-ratio intervals are wider than report.max_interval_width={r.max_interval_width} "
                       f"for {', '.join(wide)}: evaluate more held-out sequences (evaluate.max_sequences).")
    untested = [p for p in rows if p != "fp32" and not comparisons["vs_fp32"].get(p)]
    if untested:
        reasons.append(f"{', '.join(untested)} has no evaluation paired with fp32's: run the evaluate stage for it.")
    if reasons:
        return {"status": "none", "reasons": reasons}
    passing = ["fp32"] + [p for p, by in comparisons["vs_fp32"].items()
                          if all(c["verdict"] != "worse" for c in by.values())]
    cheapest = min(passing, key=lambda p: (rows[p]["train"].get("step_time_s") or math.inf, PRECISIONS.index(p)))
    decision = {"status": "recommended" if comparisons["noise"] else "provisional", "precision": cheapest,
                "passing": ordered(passing), "reasons": []}
    if not comparisons["noise"]:
        decision["reasons"].append(f"the seed-to-seed difference of two fp32 runs was not measured, so a difference "
                                   f"between precisions may be training noise: run `{noise_run}`, then "
                                   "`python -m pipeline stage=report` (`make compare` includes it).")
    return decision


def headline(rows: dict, comparisons: dict, decision: dict, columns: list[str], r: DictConfig, level: str) -> list[str]:
    """The answer in words, as Markdown list lines: what each precision costs, what each format
    keeps, and what to pick."""
    lines = []
    for precision in ordered(rows):
        row, train = rows[precision], rows[precision]["train"]
        cost = ", ".join(text.format(fmt(train[k])) for k, text, _ in COSTS if train.get(k) is not None)
        if precision != "fp32" and "fp32" in rows:
            base = rows["fp32"]["train"]
            cost += " (" + ", ".join(f"×{fmt(train[k] / base[k])} {what}" for k, _, what in COSTS
                                     if train.get(k) and base.get(k)) + " of fp32's)"
        if precision == "fp16":
            cost += f", {train.get('skipped_steps', 0)} overflow-skipped steps"
        if precision in comparisons["vs_fp32"]:
            lines.append(f"- **{precision}**: {cost}. Deployed perplexity against the fp32-trained model's at the same "
                         f"format ({level} paired interval):")
            lines += [f"  - {n}: ×{fmt(c['ratio'])}{interval(c['ratio_ci'])}, {c['verdict']}"
                      for n, c in comparisons["vs_fp32"][precision].items()]
        elif len(rows) == 1:
            lines.append(f"- **{precision}**: {cost}. Each deployed format against this {precision}-trained model "
                         f"({level} intervals):")
            own = comparisons["own"][precision]
            lines += [f"  - {n}: perplexity ×{fmt(own[n]['ratio'])}{interval(own[n]['ratio_ci'])}, KL {fmt(c['kl'])}, "
                      f"top-1 {c['top1']:.1%}, {fmt(c['size_mb'])} MB" +
                      (f", {fmt(c['output_tokens_per_s'])} tokens/s served, TTFT p50 {fmt(c['ttft_ms_p50'])} ms"
                       if c.get("output_tokens_per_s") else "")
                      for n in columns if n in own and (c := row["artifacts"][n])]
        else:
            lines.append(f"- **{precision}**: {cost}.")
    if comparisons["noise"]:
        lines.append(f"- **Noise floor**, fp32 at seed {r.noise_seed} against fp32 at the main seed; differences between "
                     "precisions within it are training noise. Perplexity ratio:")
        lines += [f"  - {n}: ×{fmt(c['ratio'])}{interval(c['ratio_ci'])}" for n, c in comparisons["noise"].items()]
    if decision["status"] == "none":
        lines.append("- **No recommendation**: " + " Also, ".join(decision["reasons"]))
    else:
        word = "Recommendation" if decision["status"] == "recommended" else "Provisional recommendation"
        lines.append(f"- **{word}: train in {decision['precision']}**, the cheapest measured training precision "
                     f"whose deployed perplexity is not significantly worse than fp32's at any format "
                     f"(passing: {', '.join(decision['passing'])}).")
        lines += [f"  - Provisional because {reason}" for reason in decision["reasons"]]
    pick = decision.get("precision") or (next(iter(rows)) if len(rows) == 1 else None)
    if pick:
        lines.append(f"- **Fastest deployed format of the {pick}-trained model per quality budget** (KL from its "
                     f"trained model, served at {r.serve_level}):")
        for budget in r.kl_budgets:
            found = fastest_within(rows[pick], budget)
            lines.append(f"  - KL ≤ {fmt(budget)}: " + (f"{found[0]}, {fmt(found[1]['output_tokens_per_s'])} tokens/s"
                                                       if found else "no served format"))
    return lines


def cell(text: str, source: str | None = None) -> dict:
    return {"text": text, "source": source}


def value_cell(data: dict, source: str, ci_key: str | None = None, prefix: str = "") -> dict:
    value, ci = lookup(data, source), lookup(data, ci_key) if ci_key else None
    return cell(f"{prefix}{fmt(value)}{interval(ci)}", source) if value is not None else cell("")


def lookup(data: dict, source: str):
    """A value of report.json by its "/"-separated path, or None."""
    node = data
    for key in source.split("/"):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def tables(data: dict, columns: list[str], confidence: float) -> list[dict]:
    """Every table of the report, each cell carrying the path of the number it shows."""
    rows, comparisons, level = data["rows"], data["comparisons"], f"{confidence:.0%}"
    out = []
    body = []
    for p in ordered(rows):
        for n in columns:
            if n not in rows[p]["artifacts"]:
                continue
            base = f"rows/{p}/artifacts/{n}"
            body.append([cell(p), cell(n),
                         value_cell(data, f"{base}/perplexity", f"{base}/perplexity_ci"),
                         value_cell(data, f"comparisons/own/{p}/{n}/ratio", f"comparisons/own/{p}/{n}/ratio_ci", "×"),
                         value_cell(data, f"{base}/kl", f"{base}/kl_ci"), value_cell(data, f"{base}/top1"),
                         value_cell(data, f"{base}/size_mb"), *(value_cell(data, f"{base}/{k}") for k in SERVED)])
    out.append({"title": f"Deployed formats against their own trained model ({level} intervals; serving columns "
                         "empty where the format was not served)",
                "header": ["training precision", "format", "perplexity", "perplexity / trained", "KL from trained",
                           "top-1 agreement", "size (MB)", "output tokens/s", "TTFT p50 (ms)", "TTFT p99 (ms)",
                           "ITL p50 (ms)"], "rows": body})
    if comparisons["vs_fp32"]:
        body = [[cell(p), *(value_cell(data, f"comparisons/vs_fp32/{p}/{n}/ratio", f"comparisons/vs_fp32/{p}/{n}/ratio_ci", "×")
                            for n in columns)] for p in ordered(comparisons["vs_fp32"])]
        if comparisons["noise"]:
            body.append([cell(f"fp32, seed {data['noise_seed']} (noise floor)"),
                         *(value_cell(data, f"comparisons/noise/{n}/ratio", f"comparisons/noise/{n}/ratio_ci", "×") for n in columns)])
        out.append({"title": f"Perplexity against the fp32-trained model's at the same format ({level} paired interval)",
                    "header": ["training precision", *columns], "rows": body})
    if comparisons["noise"] and data["noise"]:
        body = [[cell(p), *(value_cell(data, f"rows/{p}/artifacts/{n}/kl_vs_fp32", f"rows/{p}/artifacts/{n}/kl_vs_fp32_ci")
                            for n in columns)] for p in ordered(rows)]
        body.append([cell(f"fp32, seed {data['noise_seed']} (noise floor)"),
                     *(value_cell(data, f"noise/artifacts/{n}/kl_vs_fp32", f"noise/artifacts/{n}/kl_vs_fp32_ci") for n in columns)])
        out.append({"title": f"KL divergence from the fp32-trained model, beside the noise floor ({level} intervals)",
                    "header": ["training precision", *columns], "rows": body})
    training = [(p, f"rows/{p}/train") for p in ordered(rows)]
    if data["noise"]:
        training.append((f"fp32, seed {data['noise_seed']} (noise floor)", "noise/train"))
    out.append({"title": "Training", "header": ["training precision", "step time (s)", "tokens/s", "peak memory (MB)",
                                                 "held-out loss", "skipped fp16 steps", "compute dtype"],
                "rows": [[cell(p), *(value_cell(data, f"{src}/{k}") for k in (
                    "step_time_s", "tokens_per_s", "peak_memory_mb", "heldout_loss", "skipped_steps", "compute_dtype"))]
                         for p, src in training]})
    return out


def plot_data(data: dict, columns: list[str], quality: str) -> dict:
    """What each plot draws, every point with the path of its numbers in report.json. A plot with
    nothing measured to draw is left out."""
    rows, noise = data["rows"], data["noise"]
    series = [(p, f"rows/{p}", rows[p]) for p in ordered(rows)] + ([(NOISE, "noise", noise)] if noise else [])
    out = {}
    curves = [{"precision": p, "kind": kind, "points": row["train"]["history"][kind], "source": f"{src}/train/history/{kind}"}
              for p, src, row in series for kind in ("train_loss", "eval_loss") if row["train"].get("history", {}).get(kind)]
    if curves:
        out["loss_curves"] = {"xlabel": "step", "ylabel": "loss", "series": curves}
    points = [{"precision": p, "format": n, "x": c["output_tokens_per_s"], "y": c[quality],
               "source_x": f"rows/{p}/artifacts/{n}/output_tokens_per_s", "source_y": f"rows/{p}/artifacts/{n}/{quality}"}
              for p in ordered(rows) for n, c in rows[p]["artifacts"].items()
              if c.get("output_tokens_per_s") and c.get(quality) is not None]
    if points:
        fronts = {p: pareto_front([(q["x"], q["y"]) for q in points if q["precision"] == p]) for p in ordered(rows)}
        out["quality_vs_throughput"] = {"xlabel": f"output tokens/s served ({data['serve_level']})",
                                        "ylabel": "KL from its own trained model" if quality == "kl" else "held-out perplexity",
                                        "points": points, "fronts": {p: f for p, f in fronts.items() if f}}
    points = [{"precision": p, "format": n, "y": row["artifacts"][n]["perplexity"], "ci": row["artifacts"][n].get("perplexity_ci"),
               "source_y": f"{src}/artifacts/{n}/perplexity"}
              for p, src, row in series for n in columns if "perplexity" in row["artifacts"].get(n, {})]
    if points:
        out["perplexity_by_format"] = {"ylabel": "held-out perplexity", "points": points}
    if data["comparisons"]["noise"]:
        points = [{"precision": p, "format": n, "y": row["artifacts"][n]["kl_vs_fp32"],
                   "source_y": f"{src}/artifacts/{n}/kl_vs_fp32"}
                  for p, src, row in series for n in columns if row["artifacts"].get(n, {}).get("kl_vs_fp32") is not None]
        if any(q["precision"] == NOISE for q in points):
            out["kl_vs_fp32"] = {"ylabel": "KL from the fp32-trained model (symlog; 0 is exact)", "points": points}
    return out


def render(plots: dict, folder: Path, noise_seed: int) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    name = {NOISE: f"fp32 seed {noise_seed} (noise floor)"}
    made = []
    for key, plot in plots.items():
        fig, ax = plt.subplots(figsize=(8, 4.5))
        if key == "loss_curves":
            for s in plot["series"]:
                ax.plot(*zip(*s["points"]), "-" if s["kind"] == "train_loss" else "--", color=COLOURS[s["precision"]],
                        label=f"{name.get(s['precision'], s['precision'])} {s['kind'].replace('_', ' ')}")
            ax.legend(fontsize=7)
        else:
            formats = list(dict.fromkeys(q["format"] for q in plot["points"]))
            precisions = list(dict.fromkeys(q["precision"] for q in plot["points"]))
            marker = {f: MARKERS[i % len(MARKERS)] for i, f in enumerate(formats)}
            for i, q in enumerate(plot["points"]):
                colour = COLOURS[q["precision"]]
                if key == "quality_vs_throughput":
                    ax.scatter(q["x"], q["y"], color=colour, marker=marker[q["format"]], s=40)
                else:
                    x = formats.index(q["format"]) + (precisions.index(q["precision"]) - (len(precisions) - 1) / 2) * 0.15
                    if q.get("ci"):
                        ax.errorbar(x, q["y"], yerr=[[q["y"] - q["ci"][0]], [q["ci"][1] - q["y"]]], color=colour,
                                    marker=marker[q["format"]], capsize=3)
                    else:
                        ax.scatter(x, q["y"], color=colour, marker=marker[q["format"]], s=40)
                    if q["y"] == 0:
                        ax.annotate("0", (x, 0), textcoords="offset points", xytext=(0, 4), ha="center", fontsize=7)
            for p, front in plot.get("fronts", {}).items():
                ax.plot(*zip(*front), ":", color=COLOURS[p], lw=1)
            if key != "quality_vs_throughput":
                ax.set_xticks(range(len(formats)), formats, rotation=30, ha="right", fontsize=7)
            if key == "kl_vs_fp32" or (key == "quality_vs_throughput" and "KL" in plot["ylabel"]):
                positive = [q["y"] for q in plot["points"] if q["y"] > 0]
                ax.set_yscale("symlog", linthresh=10 ** math.floor(math.log10(min(positive))) if positive else 1e-6)
                ax.set_ylim(0, max(positive) * 3 if positive else 1)
            handles = [Line2D([], [], color=COLOURS[p], lw=6, label=name.get(p, p)) for p in precisions]
            handles += [Line2D([], [], color="black", marker=marker[f], ls="", label=f) for f in formats]
            if plot.get("fronts"):
                handles.append(Line2D([], [], color="black", ls=":", label="Pareto front"))
            ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        ax.set(xlabel=plot.get("xlabel", ""), ylabel=plot["ylabel"], title=TITLES[key])
        fig.tight_layout()
        fig.savefig(folder / f"{key}.png", dpi=110)
        plt.close(fig)
        made.append(folder / f"{key}.png")
    return made


def gate_results(rows: dict, precisions, gates) -> list[dict]:
    """Each gate against each precision it names (default: all); precisions not run are skipped,
    a missing value in a precision that was run fails."""
    results = []
    for gate in gates:
        for precision in [gate["precision"]] if gate.get("precision") else list(precisions):
            row = rows.get(precision)
            value = (row or {}).get("artifacts", {}).get(column(gate["artifact"]), {}).get(gate["metric"])
            if row is None:
                status = "skipped"
            elif value is not None and gate.get("max", value) >= value >= gate.get("min", value):
                status = "pass"
            else:
                status = "FAIL"
            results.append({**dict(gate), "precision": precision, "value": value, "status": status})
    return results


def gate_line(g: dict) -> str:
    bounds = " and ".join(b for b in (f"<= {g['max']}" if "max" in g else "", f">= {g['min']}" if "min" in g else "") if b)
    value = "not run" if g["status"] == "skipped" else "missing" if g["value"] is None else fmt(g["value"])
    return f"- {g['status']}: {g['precision']} {g['artifact']} {g['metric']} = {value} (limit {bounds})"


def markdown(data: dict, images: list[Path]) -> str:
    lines = ["# Which training precision, and what it costs after deployment", "", *data["headline"], "",
             data["rule"], "", *[f"- {n}" for n in data["notes"]], ""]
    for t in data["tables"]:
        lines += [f"## {t['title']}", "", "| " + " | ".join(t["header"]) + " |", "|" + "---|" * len(t["header"])]
        lines += ["| " + " | ".join(c["text"] for c in row) + " |" for row in t["rows"]] + [""]
    lines += [f"![{p.stem}]({p.name})" for p in images] + [""]
    if data["gates"]:
        lines += ["## Quality gates", ""] + [gate_line(g) for g in data["gates"]] + [""]
    return "\n".join(lines)


def inline_html(text: str) -> str:
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def html_page(data: dict, images: list[Path]) -> str:
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>precision report</title><style>",
             "body{font-family:sans-serif;margin:2em;max-width:80em}table{border-collapse:collapse;margin-bottom:1.5em}",
             "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}th{background:#f3f3f3}</style></head><body>",
             "<h1>Which training precision, and what it costs after deployment</h1><ul>"]
    nested = False
    for line in data["headline"]:
        if line.startswith("  - ") != nested:
            parts.append("<ul>" if not nested else "</ul>")
            nested = not nested
        parts.append(f"<li>{inline_html(line.strip()[2:])}</li>")
    parts.append(("</ul>" if nested else "") + f"</ul><p>{inline_html(data['rule'])}</p><ul>" + "".join(f"<li>{inline_html(n)}</li>" for n in data["notes"]) + "</ul>")
    for t in data["tables"]:
        parts.append(f"<h2>{html.escape(t['title'])}</h2><table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in t["header"]) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{html.escape(c['text'])}</td>" for c in row) + "</tr>" for row in t["rows"]]
        parts.append("</table>")
    for image in images:
        encoded = base64.b64encode(image.read_bytes()).decode()
        parts.append(f"<h2>{html.escape(image.stem)}</h2><img alt='{image.stem}' src='data:image/png;base64,{encoded}'>")
    if data["gates"]:
        parts.append("<h2>Quality gates</h2><ul>" + "".join(f"<li>{html.escape(gate_line(g)[2:])}</li>" for g in data["gates"]) + "</ul>")
    return "".join(parts) + "</body></html>\n"


def run(cfg: DictConfig, tracker) -> None:
    r, e = cfg.report, cfg.evaluate
    if r.runs:
        from mlflow.tracking import MlflowClient

        rows, noise, seeds = collect_runs(MlflowClient(str(cfg.tracking.uri)), list(r.runs), r.serve_level)
        noise_seed = seeds[1] if noise else r.noise_seed
    else:
        rows = {p: row for p in ordered(r.precisions) if (row := collect(cfg, {"train.precision": p}))}
        noise_seed = r.noise_seed
        noise = collect(cfg, {"train.precision": "fp32", "seed": noise_seed, "evaluate.reference_seed": cfg.seed})
    if not rows:
        raise FileNotFoundError(f"report: no training precision of {list(r.precisions)} has been run with these settings; "
                                f"run e.g. python -m pipeline -m train.precision={','.join(r.precisions)} stage=all first.")
    add_ratios(rows)
    columns = sorted({n for row in rows.values() for n in row["artifacts"]}, key=lambda n: (n != "trained", "." in n, n))
    comparisons = compare(rows, noise, columns, e.bootstrap, e.confidence)
    decision = decide(rows, comparisons, r, cfg)
    level = f"{e.confidence:.0%}"

    ran = ordered(rows)
    notes = [f"MLflow runs: {', '.join(r.runs)}." if r.runs else
             f"Settings: model {cfg.model.name}, data {cfg.data.name}, seed {cfg.seed}; "
             f"{len(rows[ran[0]]['sequence_tokens'])} held-out sequences; serving at {r.serve_level}."]
    if rows[ran[0]].get("scored") == "answer tokens":
        notes.append("Chat data: perplexity, KL and top-1 are measured on the answer tokens of the held-out "
                     "conversations only, and greedy agreement on answers to their prompts.")
    missing = [p for p in ordered(r.precisions) if p not in rows]
    if len(rows) > 1:
        notes += [f"{p}: not run with these settings." for p in missing]
    data = {"rows": rows, "noise": noise, "noise_seed": noise_seed, "serve_level": r.serve_level,
            "columns": columns, "comparisons": comparisons, "decision": decision, "notes": notes,
            "rule": RULE.format(level=level) if len(rows) > 1 else
            f"Quality of each format is measured against the {ran[0]}-trained model on the same held-out sequences "
            f"({level} bootstrap intervals; perplexity ratios paired by sequence).",
            "gates": gate_results(rows, r.precisions, r.gates)}
    data["headline"] = headline(rows, comparisons, decision, columns, r, level)
    data["tables"] = tables(data, columns, e.confidence)
    data["plots"] = plot_data(data, columns, r.quality_metric)

    out = stage_dir(cfg, "report")
    with atomic_dir(out) as tmp:
        images = render(data["plots"], tmp, noise_seed)
        (tmp / "report.md").write_text(markdown(data, images))
        (tmp / "report.html").write_text(html_page(data, images))
        write_json(tmp / "report.json", data)
        write_json(tmp / "gates.json", data["gates"])
        # Flat numbers per precision and artifact, for `dvc metrics show` and diffs between runs.
        write_json(tmp / "metrics.json", {p: {n: {k: v for k, v in c.items() if isinstance(v, (int, float))}
                                              for n, c in row["artifacts"].items()} for p, row in rows.items()})
    record(cfg, tracker)


def record(cfg: DictConfig, tracker) -> None:
    out = stage_dir(cfg, "report")
    data = read_json(out / "report.json")
    answer, decision = "\n".join(data["headline"]), data["decision"]
    tags = {"mlflow.note.content": answer, "report.decision": decision["status"],
            **({"report.precision": decision["precision"]} if "precision" in decision else {})}
    tracker.set_tags(tags)  # the report run's description in the MLflow UI, and the pipeline run's
    tracker.set_tags(tags, tracker.pipeline_run_id)
    tracker.log_artifacts(out, "report")
    tracker.log_metrics({f"report/{p}/{n}/perplexity_ratio_vs_fp32": c["ratio"]
                         for p, by in data["comparisons"]["vs_fp32"].items() for n, c in by.items()} |
                        {f"report/{g['precision']}/{g['artifact']}/{g['metric']}": g["value"]
                         for g in data["gates"] if g["value"] is not None})
    failed = [g for g in data["gates"] if g["status"] == "FAIL"]
    if failed:
        raise GateError(f"{len(failed)} quality gate(s) failed (report in {out}):\n" + "\n".join(gate_line(g) for g in failed))
    log.info("report: %s\n%s", out / "report.md", answer)
