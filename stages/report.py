"""report: training precision x deployed artifact, side by side, and the quality gates.

Collects, for every precision in report.precisions, what the other stages wrote for otherwise
identical settings (a Hydra sweep, the DVC matrix and single runs all leave them in the same
places): rows are training precisions, columns deployed artifacts (trained model, AWQ, RTN, each
GGUF type), cells perplexity, KL against that precision's own trained model and against the
fp32-trained one, top-1 agreement (with confidence intervals), serving speed and size; plus
training step time and peak memory. Says where intervals overlap (no significant difference) and
what the noise floor is (two fp32 runs with different seeds, when both exist).

Outputs: report.md and report.html (self-contained, plots embedded), the plots as PNG files,
report.json with every number, metrics.json (flat, for `dvc metrics`), gates.json.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

from omegaconf import DictConfig

from pipeline.artifacts import atomic_dir, read_json, stage_dir, write_json

GATE_METRICS = ("perplexity", "kl", "kl_vs_fp32", "top1", "perplexity_ratio_to_fp32", "size_mb",
                "ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50", "output_tokens_per_s")


class GateError(RuntimeError):
    """A measured value broke a configured quality gate."""


def check(cfg: DictConfig) -> None:
    from pipeline.hardware import PRECISIONS

    r = cfg.report
    bad = [p for p in r.precisions if p not in PRECISIONS or p == "auto"]
    if bad or not r.precisions:
        raise ValueError(f"report.precisions={list(r.precisions)} must list training precisions (fp32, bf16, fp16, fp8).")
    for gate in r.gates:
        if gate.get("metric") not in GATE_METRICS or ("max" not in gate and "min" not in gate) or "artifact" not in gate:
            raise ValueError(f"report.gates: {dict(gate)} needs artifact, metric (one of {', '.join(GATE_METRICS)}) "
                             "and max or min.")


def column(name: str) -> str:
    """One column for the 16-bit base GGUF file whatever its type (f16 after fp32 training, bf16 after bf16)."""
    source, _, kind = name.rpartition(".")
    return f"{source}.16bit" if kind in ("f16", "bf16") else name


def collect(cfg: DictConfig, precision: str, seed: int | None = None) -> dict | None:
    """Everything the stages wrote for `precision` (and `seed`), or None if it was never trained."""
    run = cfg.copy()
    run.train.precision = precision
    if seed is not None:
        run.seed = seed
    train = stage_dir(run, "train") / "summary.json"
    if not train.exists():
        return None
    found = {"train": read_json(train), "artifacts": {}}
    evaluation = stage_dir(run, "evaluate") / "summary.json"
    if evaluation.exists():
        found["artifacts"] = {column(n): dict(v) for n, v in read_json(evaluation).items()}
    serving = stage_dir(run, "serve") / "summary.json"
    if serving.exists():
        for name, result in read_json(serving)["results"].items():
            level = result.get("levels", {}).get(cfg.report.serve_level)
            if result["status"] == "ok" and level and column(name) in found["artifacts"]:
                found["artifacts"][column(name)].update({k: level[k] for k in (
                    "ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50", "output_tokens_per_s") if k in level})
    return found


def collect_runs(client, run_ids: list[str], serve_level: str) -> tuple[dict, dict]:
    """Rows from MLflow pipeline runs (the parent runs), wherever they were run. A second fp32
    run with another seed is kept aside as the noise floor. Returns (rows, {precision: [(seed, row)]})."""
    import json
    import tempfile

    seeds = {}
    for run_id in run_ids:
        parent = client.get_run(run_id)
        precision, seed = parent.data.params["train.precision"], int(parent.data.params["seed"])
        children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
        by_stage = {c.data.tags.get("stage"): c for c in children}
        if "train" not in by_stage:
            raise ValueError(f"report.runs: MLflow run {run_id} has no train stage.")
        with tempfile.TemporaryDirectory() as tmp:
            train = json.loads(Path(client.download_artifacts(by_stage["train"].info.run_id, "summary.json", tmp)).read_text())
        artifacts = {}
        for key, value in (by_stage["evaluate"].data.metrics if "evaluate" in by_stage else {}).items():
            parts = key.split("/")  # eval/<artifact>/<metric>; slices have one part more
            if len(parts) != 3:
                continue
            cell = artifacts.setdefault(column(parts[1]), {})
            base, _, side = parts[2].rpartition("_")
            if side in ("low", "high"):
                cell.setdefault(f"{base}_ci", [None, None])[side == "high"] = value
            else:
                cell[parts[2]] = value
        for key, value in (by_stage["serve"].data.metrics if "serve" in by_stage else {}).items():
            parts = key.split("/")  # serve/<artifact>/<level>/<metric>
            if len(parts) == 4 and parts[2] == serve_level and column(parts[1]) in artifacts:
                artifacts[column(parts[1])][parts[3]] = value
        seeds.setdefault(precision, []).append((seed, {"train": train, "artifacts": artifacts}))
    rows = {p: found[0][1] for p, found in seeds.items()}
    return rows, seeds


def add_ratios(rows: dict) -> None:
    fp32 = (rows.get("fp32") or {}).get("artifacts", {})
    for row in rows.values():
        for name, cell in (row or {}).get("artifacts", {}).items():
            if name in fp32:
                cell["perplexity_ratio_to_fp32"] = cell["perplexity"] / fp32[name]["perplexity"]
            if "kl_vs_fp32" not in cell and row is rows.get("fp32"):
                cell["kl_vs_fp32"], cell["kl_vs_fp32_ci"] = cell["kl"], cell["kl_ci"]


def overlaps(a, b) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def fmt(value, digits=3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if not isinstance(value, (int, float)):
        return str(value)
    if abs(value) < 1e-2 and value != 0:
        return f"{value:.2e}"
    return f"{value:.{digits}g}" if abs(value) >= 1000 else f"{value:.{digits}f}"


def tables(rows: dict, columns: list[str], confidence: float) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, body rows) of every table in the report."""
    level = f"{confidence:.0%}"
    fp32 = (rows.get("fp32") or {}).get("artifacts", {})
    out = []

    def grid(title, key, ci=None, mark=False):
        body = []
        for precision, row in rows.items():
            cells = [precision]
            for name in columns:
                cell = (row or {}).get("artifacts", {}).get(name)
                if not cell or cell.get(key) is None:
                    cells.append("n/a")
                    continue
                text = fmt(cell[key])
                if ci and cell.get(ci):
                    text += f" [{fmt(cell[ci][0])}, {fmt(cell[ci][1])}]"
                if mark and precision != "fp32" and name in fp32 and overlaps(cell[ci], fp32[name][ci]):
                    text += " ≈"
                cells.append(text)
            body.append(cells)
        out.append((title, ["training precision", *columns], body))

    grid(f"Perplexity ({level} CI; ≈: overlaps the fp32 row, not a significant difference)", "perplexity",
         "perplexity_ci", mark=True)
    grid(f"KL divergence from this precision's own trained model ({level} CI)", "kl", "kl_ci")
    grid(f"KL divergence from the fp32-trained model ({level} CI)", "kl_vs_fp32", "kl_vs_fp32_ci")
    grid("Top-1 agreement with this precision's own trained model", "top1")
    grid("Perplexity / the fp32-trained row's", "perplexity_ratio_to_fp32")
    grid("Serving: TTFT p50 (ms)", "ttft_ms_p50")
    grid("Serving: ITL p50 (ms)", "itl_ms_p50")
    grid("Serving: output tokens/s", "output_tokens_per_s")
    grid("Size on disk (MB)", "size_mb")
    body = [[p, *(fmt((row or {}).get("train", {}).get(k)) for k in
                  ("step_time_s", "peak_memory_mb", "heldout_loss", "skipped_steps", "compute_dtype"))]
            if row else [p, "not run", "", "", "", ""] for p, row in rows.items()]
    out.append(("Training", ["training precision", "step time (s)", "peak memory (MB)", "held-out loss",
                             "skipped fp16 steps", "compute dtype"], body))
    return out


def plots(rows: dict, columns: list[str], folder: Path, quality: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for precision, row in rows.items():
        for key, style in (("train_loss", "-"), ("eval_loss", "--")):
            points = (row or {}).get("train", {}).get("history", {}).get(key, [])
            if points:
                ax.plot(*zip(*points), style, label=f"{precision} {key.replace('_', ' ')}")
    ax.set(xlabel="step", ylabel="loss", title="Loss per training precision")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    made.append(_save(fig, folder / "loss_curves.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    points = [(cell["output_tokens_per_s"], cell[quality], f"{p}/{name}") for p, row in rows.items()
              for name, cell in (row or {}).get("artifacts", {}).items()
              if cell.get("output_tokens_per_s") and cell.get(quality) is not None]
    for x, y, label in points:
        ax.scatter(x, y, s=18)
        ax.annotate(label, (x, y), fontsize=6)
    front = pareto_front([(x, y) for x, y, _ in points])
    if front:
        ax.plot(*zip(*front), "r-o", mfc="none", ms=11, label="Pareto front")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    ax.set(xlabel="output tokens/s (served)", ylabel=quality, title=f"{quality} against throughput")
    made.append(_save(fig, folder / "quality_vs_throughput.png"))

    fig, ax = plt.subplots(figsize=(max(7, len(columns)), 4))
    width = 0.8 / max(1, len(rows))
    for i, (precision, row) in enumerate(rows.items()):
        values = [max((row or {}).get("artifacts", {}).get(n, {}).get("kl_vs_fp32") or 0, 1e-12) for n in columns]
        ax.bar([c + i * width for c in range(len(columns))], values, width, label=precision)
    ax.set_yscale("log")
    ax.set_xticks([c + width * (len(rows) - 1) / 2 for c in range(len(columns))], columns, rotation=30, ha="right", fontsize=7)
    ax.set(ylabel="KL from the fp32-trained model", title="KL per deployed format and training precision")
    ax.legend(fontsize=7)
    made.append(_save(fig, folder / "kl_by_format.png"))
    return made


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points no other point beats on both throughput (higher) and the quality loss (lower)."""
    front = [p for p in points if not any(q[0] >= p[0] and q[1] <= p[1] and q != p for q in points)]
    return sorted(set(front))


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def gate_results(rows: dict, gates) -> list[dict]:
    """Each gate against each precision it names (default: all); precisions not run are skipped,
    a missing value in a precision that was run fails."""
    results = []
    for gate in gates:
        for precision in [gate["precision"]] if gate.get("precision") else list(rows):
            row = rows.get(precision)
            cell = (row or {}).get("artifacts", {}).get(column(gate["artifact"])) or {}
            value = cell.get(gate["metric"])
            if row is None:
                status = "skipped"
            elif value is not None and gate.get("max", value) >= value >= gate.get("min", value):
                status = "pass"
            else:
                status = "FAIL"
            results.append({**dict(gate), "precision": precision, "value": value, "status": status})
    return results


def markdown(title_tables, notes: list[str], images: list[Path], gates: list[dict]) -> str:
    lines = ["# Training precision x deployed format", "", *notes, ""]
    for title, header, body in title_tables:
        lines += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in body] + [""]
    lines += [f"![{p.stem}]({p.name})" for p in images] + [""]
    if gates:
        lines += ["## Quality gates", ""] + [gate_line(g) for g in gates] + [""]
    return "\n".join(lines)


def gate_line(g: dict) -> str:
    bounds = " and ".join(b for b in (f"<= {g['max']}" if "max" in g else "", f">= {g['min']}" if "min" in g else "") if b)
    return f"- {g['status']}: {g['precision']} {g['artifact']} {g['metric']} = {fmt(g['value'])} (limit {bounds})"


def html_page(title_tables, notes: list[str], images: list[Path], gates: list[dict]) -> str:
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>precision report</title><style>",
             "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:1.5em}",
             "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}th{background:#f3f3f3}</style></head><body>",
             "<h1>Training precision x deployed format</h1>"]
    parts += [f"<p>{html.escape(n)}</p>" for n in notes]
    for title, header, body in title_tables:
        parts.append(f"<h2>{html.escape(title)}</h2><table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body]
        parts.append("</table>")
    for image in images:
        data = base64.b64encode(image.read_bytes()).decode()
        parts.append(f"<h2>{html.escape(image.stem)}</h2><img alt='{image.stem}' src='data:image/png;base64,{data}'>")
    if gates:
        parts.append("<h2>Quality gates</h2><ul>" + "".join(f"<li>{html.escape(gate_line(g)[2:])}</li>" for g in gates) + "</ul>")
    return "".join(parts) + "</body></html>\n"


def run(cfg: DictConfig, tracker) -> None:
    r = cfg.report
    if r.runs:
        rows, seeds = collect_runs(tracker.client, list(r.runs), r.serve_level)
        fp32_runs = seeds.get("fp32", [])
        seed = fp32_runs[0][0] if fp32_runs else cfg.seed
        noise_seed, other = fp32_runs[1] if len(fp32_runs) > 1 else (None, None)
    else:
        rows = {p: collect(cfg, p) for p in r.precisions}
        seed, noise_seed = cfg.seed, r.noise_seed if r.noise_seed is not None else cfg.seed + 1
        other = collect(cfg, "fp32", noise_seed)
    if not any(rows.values()):
        raise FileNotFoundError(f"report: no training precision of {list(r.precisions)} has been run with these settings; "
                                f"run e.g. python -m pipeline -m train.precision={','.join(r.precisions)} stage=all first.")
    add_ratios(rows)
    columns = sorted({n for row in rows.values() if row for n in row["artifacts"]},
                     key=lambda n: (n != "trained", "." in n, n))

    notes = [f"Settings: model {cfg.model.name}, data {cfg.data.name}, seed {seed}."
             if not r.runs else f"MLflow runs: {', '.join(r.runs)}."]
    missing = [p for p, row in rows.items() if row is None]
    if missing:
        notes.append(f"Not run with these settings: {', '.join(missing)}.")
    if rows.get("fp32") and other and "trained" in other["artifacts"] and "trained" in rows["fp32"]["artifacts"]:
        a, b = rows["fp32"]["artifacts"]["trained"]["perplexity"], other["artifacts"]["trained"]["perplexity"]
        notes.append(f"Noise floor: two fp32 runs with seeds {seed} and {noise_seed} differ in perplexity by "
                     f"{abs(a - b):.4g} ({abs(a - b) / a:.2%}); differences between precisions smaller than this are noise.")
    else:
        notes.append(f"Noise floor unknown: also run train.precision=fp32 seed={noise_seed or seed + 1} to measure it.")

    out = stage_dir(cfg, "report")
    gates = gate_results(rows, r.gates)
    with atomic_dir(out) as tmp:
        images = plots(rows, columns, tmp, r.quality_metric)
        title_tables = tables(rows, columns, cfg.evaluate.confidence)
        (tmp / "report.md").write_text(markdown(title_tables, notes, images, gates))
        (tmp / "report.html").write_text(html_page(title_tables, notes, images, gates))
        write_json(tmp / "report.json", {"rows": rows, "columns": columns, "notes": notes})
        write_json(tmp / "gates.json", gates)
        # Flat numbers per precision and artifact, for `dvc metrics show` and diffs between runs.
        write_json(tmp / "metrics.json", {p: {n: {k: v for k, v in cell.items() if isinstance(v, (int, float))}
                                              for n, cell in row["artifacts"].items()}
                                          for p, row in rows.items() if row})

    tracker.log_artifacts(out, "report")
    tracker.log_metrics({f"report/{g['precision']}/{g['artifact']}/{g['metric']}": g["value"]
                         for g in gates if g["value"] is not None})
    failed = [g for g in gates if g["status"] == "FAIL"]
    if failed:
        raise GateError(f"{len(failed)} quality gate(s) failed (report in {out}):\n" + "\n".join(gate_line(g) for g in failed))
