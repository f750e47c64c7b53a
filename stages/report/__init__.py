"""report: which training precision to use, and what each deployed format costs, in words first.

Collects, for every precision in report.precisions, what the other stages wrote for otherwise
identical settings (a Hydra sweep, the DVC matrix and single runs all leave them in the same
places), plus the fp32 noise-floor run (the same settings at report.noise_seed, measured against
the main seed's fp32 model) where it exists. Only what was measured is shown: a precision that was
not run gets one "not run" line, never a cell, bar or point.

- One precision: each deployed format against the run's own trained model (perplexity ratio with
  a paired interval, KL, top-1), its size and serving speed with intervals, and the fastest format
  per KL budget, where only a significant speed difference ranks two formats.
- Several: each precision's training cost against fp32's, its deployed perplexity against the
  fp32-trained model's at the same format (paired bootstrap over the same held-out sequences),
  judged against the seed-to-seed difference of two fp32 runs, and a recommendation by the rule
  that RULE states, or the reason there is none and what to run to get one.
- For every deployed artifact, the quality each step that made it cost (training precision,
  conversion, AWQ smoothing, quantization), as a table and a waterfall plot.

The package: collect (what is read), stats (the statistics and the decision rule), text (words,
tables, pages), render (plots), register (the deployable in MLflow's Model Registry). Outputs:
report.md and report.html (self-contained, plots embedded), the plots as PNG files, report.json
(every number, the data behind every plot and table cell, each with its source), metrics.json
(flat, for `dvc metrics`), gates.json.
"""

from __future__ import annotations

import functools
import logging
import re

from omegaconf import DictConfig

from pipeline import console
from pipeline.artifacts import atomic_dir, read_json, stage_dir, write_json
from pipeline.contract import PipelineError, Stage, declared
from pipeline.formats import NO_QAT, QAT
from pipeline.tracking import JOURNAL
from stages.report.collect import add_ratios, collect, collect_runs
from stages.report.register import register, registering
from stages.report.render import TITLES, plot_data, render
from stages.report.stats import (GATE_METRICS, compare, decide, deployable, faster, gate_results, ordered,
                                 qat_against_ptq, waterfall)
from stages.report.text import (RULE, deploy_lines, gate_line, grid_lines, headline, html_page, markdown, qat_lines,
                                tables, training_checks)

# It reads every precision's outputs, beyond its own address, so it always runs (in seconds).
# It also reads the deployable artifact and the data hash where it registers (register.py).
STAGE = Stage("report", settings=("report",), reads=("prepare", "train", "quantize", "export", "evaluate", "serve"),
              scope="sweep", reusable=False)
__all__ = ["STAGE", "TITLES", "check", "run", "record"]

log = logging.getLogger(__name__)


class GateError(PipelineError):
    """A measured value broke a configured quality gate."""


def check(cfg: DictConfig) -> None:
    r = cfg.report
    if r.runs and str(cfg.tracking.uri) == JOURNAL:
        raise ValueError(f"report.runs={list(r.runs)} reads MLflow runs, and tracking=journal has no MLflow store: "
                         "give report.runs a store's tracking.uri, or leave report.runs empty.")
    if r.register and str(cfg.tracking.uri) == JOURNAL:
        raise ValueError("report.register=true registers in MLflow's Model Registry, and tracking=journal has no MLflow "
                         "store: track to a store (tracking=local or tracking=server), or set report.register=false.")
    if registering(cfg) and (not r.registered_model.strip() or set("'\"`") & set(r.registered_model)):
        raise ValueError(f"report.registered_model={r.registered_model!r} must be a name for MLflow's Model Registry, "
                         "not empty and without quotes, e.g. base-stdlib.")
    if r.noise_seed == cfg.seed:
        raise ValueError(f"report.noise_seed={r.noise_seed} equals seed={cfg.seed}: the noise floor needs a second "
                         f"fp32 run with another seed, e.g. report.noise_seed={cfg.seed + 1}.")
    if not all(b > 0 for b in r.kl_budgets):
        raise ValueError(f"report.kl_budgets={list(r.kl_budgets)} must be positive.")
    for gate in r.gates:
        if gate.get("metric") not in GATE_METRICS or ("max" not in gate and "min" not in gate) or "artifact" not in gate:
            raise ValueError(f"report.gates: {dict(gate)} needs artifact, metric (one of {', '.join(GATE_METRICS)}) "
                             "and max or min.")


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
    # Both QAT arms of each precision, whichever arm this report's run is.
    arms = {p: found for p in ordered(r.precisions)
            if len(found := {q: row for q in (NO_QAT, *QAT) if (row := collect(cfg, {"train.precision": p, "train.qat": q}))}) > 1}
    # The deployed formats (the unmerged LoRA model is measured for the waterfall's merge step only).
    unmerged = declared("evaluate").names["unmerged"]
    columns = sorted({n for row in rows.values() for n in row["artifacts"] if n != unmerged},
                     key=lambda n: (n != "trained", "." in n, n))
    comparisons = compare(rows, noise, columns, e.bootstrap, e.confidence)
    decision = decide(rows, comparisons, r, cfg)
    level = f"{e.confidence:.0%}"

    ran = ordered(rows)
    notes = [f"MLflow runs: {', '.join(r.runs)}." if r.runs else
             f"Settings: model {cfg.model.name}, data {cfg.data.name}, seed {cfg.seed}; "
             f"{len(rows[ran[0]]['sequence_tokens'])} held-out sequences; serving at {r.serve_level}."]
    if rows[ran[0]]["train"].get("weights_origin"):
        notes.append(f"Starting weights: {rows[ran[0]]['train']['weights_origin']}.")
    if rows[ran[0]].get("scored") == "answer tokens":
        notes.append("Chat data: perplexity, KL and top-1 are measured on the answer tokens of the held-out "
                     "conversations only, and greedy agreement on answers to their prompts.")
    if cfg.train.qat != NO_QAT:
        notes.append(f"The rows are of models trained with QAT for {QAT[cfg.train.qat].label} (train.qat={cfg.train.qat}).")
    missing = [p for p in ordered(r.precisions) if p not in rows]
    if len(rows) > 1:
        notes += [f"{p}: not run with these settings." for p in missing]
    data = {"rows": rows, "noise": noise, "noise_seed": noise_seed, "serve_level": r.serve_level,
            "columns": columns, "comparisons": comparisons, "decision": decision, "notes": notes,
            "waterfall": waterfall(rows, columns, e.bootstrap, e.confidence),
            "rule": RULE.format(level=level) if len(rows) > 1 else
            f"Quality of each format is measured against the {ran[0]}-trained model on the same held-out sequences "
            f"({level} bootstrap intervals; perplexity ratios paired by sequence). Served figures carry {level} "
            "intervals over their rounds and requests, and one format is called faster than another only where the "
            "interval of their throughput ratio over the serving rounds excludes 1.",
            "gates": gate_results(rows, r.precisions, r.gates),
            "qat": qat_against_ptq(arms, e.bootstrap, e.confidence),
            # The other arms' training, beside this report's own rows.
            "qat_train": {p: {q: row["train"] for q, row in by.items() if q != cfg.train.qat} for p, by in arms.items()},
            "deploy": deployable(rows, decision, r.deploy_kl, e.bootstrap, e.confidence)}
    data["checks"] = training_checks(rows, comparisons)
    data["headline"] = (headline(rows, comparisons, decision, columns, r, e.confidence, e.bootstrap, data["checks"])
                        + grid_lines(rows, level) + qat_lines(data["qat"], level)
                        + deploy_lines(data["deploy"], r.registered_model if registering(cfg) else None))
    data["tables"] = tables(data, columns, e.confidence)
    data["plots"] = plot_data(data, columns, r.quality_metric,
                              functools.partial(faster, resamples=e.bootstrap, confidence=e.confidence))

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
            **({"report.check_training": " ".join(data["checks"])} if data["checks"] else {}),
            **({"report.precision": decision["precision"]} if "precision" in decision else {})}
    tracker.set_tags(tags)  # the report run's description in the MLflow UI, and the pipeline run's
    tracker.set_tags(tags, tracker.pipeline_run_id)
    tracker.log_artifacts(out, "report")
    tracker.log_metrics({f"report/{p}/{n}/perplexity_ratio_vs_fp32": c["ratio"]
                         for p, by in data["comparisons"]["vs_fp32"].items() for n, c in by.items()} |
                        {f"report/{p}/{n}/{re.sub(r'[^a-z0-9]+', '_', s['step'].lower()).strip('_')}/perplexity_ratio": s["ratio"]
                         for p, by in data["waterfall"].items() for n, steps in by.items() for s in steps} |
                        {f"report/{g['precision']}/{g['artifact']}/{g['metric']}": g["value"]
                         for g in data["gates"] if g["value"] is not None})
    if registering(cfg):  # before a failed gate stops the stage: the version is kept, without the alias
        console.say(register(cfg, tracker, data))
    failed = [g for g in data["gates"] if g["status"] == "FAIL"]
    if failed:
        raise GateError(f"{len(failed)} quality gate(s) failed (report in {out}): "
                        + "; ".join(gate_line(g).removeprefix("- ") for g in failed))
    log.info("report: %s\n%s", out / "report.md", answer)
    console.say(answer)  # the answer in words, where the person who ran it looks
