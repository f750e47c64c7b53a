"""The report in words and tables: the headline answer, the rule it follows, every table (each cell
carrying the path of the number it shows), and the Markdown and self-contained HTML pages."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from omegaconf import DictConfig

from pipeline.formats import NO_QAT
from pipeline.metrics import KL_PERCENTILES
from stages.report.collect import SERVED
from stages.report.stats import below_source, fastest_within, ordered

# Training cost: summary key, how it reads, and its name in a ratio to fp32's.
COSTS = (("step_time_s", "training step {} s", "step time"), ("tokens_per_s", "{} tokens/s", "tokens/s"),
         ("peak_memory_mb", "peak memory {} MB", "peak memory"))
RULE = ("Rule: a training precision passes at a deployed format when its held-out perplexity there is not "
        "significantly higher than the fp32-trained model's at the same format: the {level} paired-bootstrap interval "
        "of the ratio (same held-out sequences) does not lie wholly above 1 + the seed-to-seed difference of two "
        "fp32 runs at that format (0 where that was not measured). The recommendation is the passing precision with "
        "the lowest measured training step time that passes at every format. A served format is faster than another "
        "only where the {level} interval of their throughput ratio (over the serving rounds) excludes 1; otherwise "
        "they are ≈ in speed and the smaller file is named.")
UNDERTRAINED = ("lower than its trained model's: a sign of an undertrained model, whose predictions quantization "
                "noise flattens, not a gain")


def fmt(value) -> str:
    if isinstance(value, int) or not isinstance(value, float):
        return str(value)
    if abs(value) < 1e-2 and value != 0:
        return f"{value:.2e}"
    return f"{value:.{0 if abs(value) >= 1000 else 1 if abs(value) >= 100 else 3}f}"


def interval(ci) -> str:
    return f" [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else ""


def ratio(c: dict) -> str:
    """A ratio and its interval to four decimals: near 1, three would hide what is measured."""
    return f"×{c['ratio']:.4f} [{c['ratio_ci'][0]:.4f}, {c['ratio_ci'][1]:.4f}]"


def on_every(c: dict) -> str:
    """Where a comparison of trained models was paired on every held-out sequence, not the artifacts' first ones."""
    return f" (on all {c['sequences']} held-out sequences)" if "sequences" in c else ""


def served_text(c: dict) -> str:
    if not c.get("output_tokens_per_s"):
        return ""
    checked = (f", served perplexity ×{c['served_perplexity_ratio']:.4f} of the checkpoint's"
               if "served_perplexity_ratio" in c else "")
    return (f", {fmt(c['output_tokens_per_s'])}{interval(c.get('output_tokens_per_s_ci'))} tokens/s served by "
            f"{c['served_by']}, TTFT p50 {fmt(c['ttft_ms_p50'])}{interval(c.get('ttft_ms_p50_ci'))} ms{checked}")


def layout_text(c: dict) -> str:
    """A GGUF file's bits per weight, and the tensors llama.cpp kept in other types (its usual
    fallback where rows do not fill the type's blocks: rows of 576 in blocks of 256)."""
    if c.get("bits_per_weight") is None:
        return ""
    kept = c.get("fallback_tensors") or 0
    return (f" ({c['bits_per_weight']:.2f} bits a weight"
            + (f"; {kept} tensors in other types, whose rows do not fill its blocks" if kept else "") + ")")


def budget_line(found: dict | None, budget: float) -> str:
    if found is None:
        return f"  - KL ≤ {fmt(budget)}: no served format"
    c = found["cell"]
    speed = f"{fmt(c['output_tokens_per_s'])}{interval(c.get('output_tokens_per_s_ci'))} tokens/s"
    if found["same_speed"]:
        return (f"  - KL ≤ {fmt(budget)}: {', '.join(found['same_speed'])} are ≈ in speed at this model size (no "
                f"significant difference); the smallest file is {found['format']} ({c['size_mb']:.1f} MB, {speed})")
    if found["within"] == 1:
        return f"  - KL ≤ {fmt(budget)}: {found['format']}, {speed}, the only served format within budget"
    return f"  - KL ≤ {fmt(budget)}: {found['format']}, {speed}, significantly faster than the others within budget"


def training_checks(rows: dict, comparisons: dict) -> list[str]:
    """The signs of a fine-tune gone wrong, one sentence each: a held-out loss left above where the
    model started, and deployed formats measured better than the model they were made from."""
    checks = [why for p in ordered(rows) if (why := rows[p]["train"].get("check"))]
    flagged = [f"{p} {n}" for p in ordered(rows) for n, c in comparisons["own"].get(p, {}).items() if below_source(c)]
    if flagged:
        checks.append(f"the perplexity of {', '.join(flagged)} is {UNDERTRAINED}.")
    return checks


def headline(rows: dict, comparisons: dict, decision: dict, columns: list[str], r: DictConfig, confidence: float,
             resamples: int, checks: list[str]) -> list[str]:
    """The answer in words, as Markdown list lines: what each precision costs, what each format
    keeps, and what to pick; first the training's `checks` (training_checks)."""
    lines, level = [], f"{confidence:.0%}"
    # First, since every number below is of a model the fine-tune may have damaged.
    lines += [f"- **Check the training**: {check}" for check in checks]
    for precision in ordered(rows):
        row, train = rows[precision], rows[precision]["train"]
        cost = ", ".join(text.format(fmt(train[k])) for k, text, _ in COSTS if train.get(k) is not None)
        if precision != "fp32" and "fp32" in rows:
            base = rows["fp32"]["train"]
            cost += " (" + ", ".join(f"×{fmt(train[k] / base[k])} {what}" for k, _, what in COSTS
                                     if train.get(k) and base.get(k)) + " of fp32's)"
        if precision == "fp16":
            cost += f", {train.get('skipped_steps', 0)} overflow-skipped steps"
        if train.get("start_heldout_loss") is not None:
            cost += f"; held-out loss {fmt(train['start_heldout_loss'])} before training, {fmt(train['heldout_loss'])} after"
        if precision in comparisons["vs_fp32"]:
            lines.append(f"- **{precision}**: {cost}. Deployed perplexity against the fp32-trained model's at the same "
                         f"format ({level} paired interval):")
            lines += [f"  - {n}: {ratio(c)}{on_every(c)}, {c['verdict']}" for n, c in comparisons["vs_fp32"][precision].items()]
        elif len(rows) == 1:
            lines.append(f"- **{precision}**: {cost}. Each deployed format against this {precision}-trained model "
                         f"({level} intervals):")
            own = comparisons["own"][precision]
            lines += [f"  - {n}: perplexity {ratio(own[n])}"
                      f"{f' ({UNDERTRAINED})' if below_source(own[n]) else ''}, KL {fmt(c['kl'])}, "
                      f"top-1 {c['top1']:.1%}, {c['size_mb']:.1f} MB{layout_text(c)}{served_text(c)}"
                      for n in columns if n in own and (c := row["artifacts"][n])]
        else:
            lines.append(f"- **{precision}**: {cost}.")
    if comparisons["noise"]:
        lines.append(f"- **Noise floor**, fp32 at seed {r.noise_seed} against fp32 at the main seed; differences between "
                     "precisions within it are training noise. Perplexity ratio:")
        lines += [f"  - {n}: {ratio(c)}{on_every(c)}" for n, c in comparisons["noise"].items()]
    if decision["status"] == "none":
        lines.append("- **No recommendation**: " + " Also, ".join(decision["reasons"]))
    else:
        word = "Recommendation" if decision["status"] == "recommended" else "Provisional recommendation"
        if decision.get("alone"):
            lines.append(f"- **{word}: train in {decision['precision']}**, the only training precision measured.")
        else:
            lines.append(f"- **{word}: train in {decision['precision']}**, the cheapest measured training precision "
                         f"whose deployed perplexity is not significantly worse than fp32's at any format "
                         f"(passing: {', '.join(decision['passing'])}).")
        lines += [f"  - Provisional because {reason}" for reason in decision["reasons"]]
    pick = decision.get("precision") or (next(iter(rows)) if len(rows) == 1 else None)
    if pick:
        lines.append(f"- **Fastest deployed format of the {pick}-trained model per quality budget** (KL from its "
                     f"trained model, served at {r.serve_level}):")
        lines += [budget_line(fastest_within(rows[pick], b, resamples, confidence), b) for b in r.kl_budgets]
    return lines


def deploy_lines(deploy: dict, registered_model: str | None) -> list[str]:
    """What goes to deployment, and whether the Model Registry gets it (registered_model: None where
    the report does not register)."""
    if "reason" in deploy:
        return [f"- **Nothing registered** in MLflow's Model Registry: {deploy['reason']}."] if registered_model else []
    where = (f"; registered in MLflow's Model Registry as {registered_model}, with the alias `candidate` where every "
             "gate passes" if registered_model else "")
    return [f"- **To deploy**: the {deploy['precision']}-trained model as {deploy['format']}, {deploy['why']} with a KL "
            f"within report.deploy_kl={fmt(deploy['kl_budget'])}{where}."]


def qat_lines(found: dict, level: str) -> list[str]:
    """QAT against post-training quantization, in words: one line per precision and format."""
    lines = []
    for precision in ordered(found):
        for c in found[precision].values():
            loss = ratio({"ratio": c["ptq_loss"], "ratio_ci": c["ptq_loss_ci"]})
            recovered = (f"it recovered {c['recovered']:.0%} [{c['recovered_ci'][0]:.0%}, {c['recovered_ci'][1]:.0%}] of "
                         f"PTQ's perplexity loss ({loss})" if c["recovered"] is not None else
                         f"PTQ's own loss at this format is not significant ({loss}), so there is none to recover")
            if c["recovered"] is not None and c["recovered_ci"][0] > 1:
                # More than all of it: QAT's run trained to a better model, not only to a better rounding.
                recovered += (", more than all of it: the QAT model in this format beats the model trained without "
                              "QAT before any quantization")
            lines.append(f"- **QAT for {c['label']}** ({precision}): {c['artifact']}'s perplexity {ratio(c)} that of PTQ "
                         f"at the same format ({level} paired interval), {c['verdict']}; {recovered}"
                         + (f"; ×{fmt(c['step_time_ratio'])} the step time" if c["step_time_ratio"] else "") + ".")
    return lines


def grid_lines(rows: dict, level: str) -> list[str]:
    """The starting weights' grid effect (evaluate.grid_effect), from the first row that measured it:
    a 4-bit type's KL on the weights as a quantized file shipped them, against the fine-tuned ones."""
    found = next((row["grid_effect"] for p in ordered(rows) if (row := rows[p]).get("grid_effect")), None)
    if found is None:
        return []
    start, trained, kind = found["starting"], found["trained"], found["type"]
    if trained["kl_ci"][0] > start["kl_ci"][1]:
        verdict = (f"{trained['kl'] / start['kl']:.1f}× the starting model's: the weights as shipped sit on the file's "
                   f"grid, which {kind} nearly keeps, and the fine-tune moved them off it, so the fine-tuned figure is "
                   "the one a deployment pays")
    elif start["kl_ci"][0] > trained["kl_ci"][1]:
        verdict = (f"the starting model's is {start['kl'] / trained['kl']:.1f}× it: the grid the file shipped the weights "
                   f"on gives {kind} no discount, so the fine-tuned figure is not flattered by it")
    else:
        verdict = (f"within each other's intervals: the grid the file shipped the weights on makes no measured "
                   f"difference to {kind}'s cost")
    return [f"- **The starting weights' grid**: {kind} made from the starting weights costs KL {fmt(start['kl'])}"
            f"{interval(start['kl_ci'])} against the starting model; made from the fine-tuned weights, KL "
            f"{fmt(trained['kl'])}{interval(trained['kl_ci'])} against the fine-tuned model ({level} intervals), {verdict}."]


def cell(text: str, source: str | None = None) -> dict:
    return {"text": text, "source": source}


def value_cell(data: dict, source: str, ci_key: str | None = None, prefix: str = "") -> dict:
    value, ci = lookup(data, source), lookup(data, ci_key) if ci_key else None
    if value is None:
        return cell("")
    return cell(ratio({"ratio": value, "ratio_ci": ci}) if prefix == "×" and ci else f"{prefix}{fmt(value)}{interval(ci)}", source)


def lookup(data: dict, source: str):
    """A value of report.json by its "/"-separated path, or None."""
    node = data
    for key in source.split("/"):
        if isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        elif not isinstance(node, dict) or key not in node:
            return None
        else:
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
                         value_cell(data, f"{base}/size_mb"), value_cell(data, f"{base}/bits_per_weight"),
                         value_cell(data, f"{base}/fallback_tensors"), value_cell(data, f"{base}/served_by"),
                         *(value_cell(data, f"{base}/{k}", f"{base}/{k}_ci") for k in SERVED)])
    out.append({"title": f"Deployed formats against their own trained model ({level} intervals; serving columns "
                         "empty where the format was not served)",
                "header": ["training precision", "format", "perplexity", "perplexity / trained", "KL from trained",
                           "top-1 agreement", "size (MB)", "bits a weight",
                           "tensors in other types", "served by", "output tokens/s", "TTFT p50 (ms)", "TTFT p99 (ms)",
                           "ITL p50 (ms)"], "rows": body})
    body = []
    for p in ordered(rows):
        for n in columns:
            base = f"rows/{p}/artifacts/{n}"
            if n == "trained" or lookup(data, f"{base}/rms_dp") is None:
                continue
            body.append([cell(p), cell(n), value_cell(data, f"{base}/kl"),
                         *(value_cell(data, f"{base}/{k}") for k in KL_PERCENTILES),
                         value_cell(data, f"{base}/rms_dp"), value_cell(data, f"{base}/top1", f"{base}/same_top_ci")])
    if body:
        out.append({"title": f"Token statistics against the trained model, as llama-perplexity reports them (same top "
                             f"token: {level} binomial interval)",
                    "header": ["training precision", "format", "mean KL", "KL median", "KL p95", "KL p99", "KL p99.9",
                               "RMS Δp", "same top token"], "rows": body})
    body = [[cell(p), cell(n), cell(s["step"]), cell(f"{s['from']} → {s['to']}"),
             value_cell(data, f"waterfall/{p}/{n}/{i}/ratio", f"waterfall/{p}/{n}/{i}/ratio_ci", "×")]
            for p in ordered(data["waterfall"]) for n, steps in data["waterfall"][p].items() for i, s in enumerate(steps)]
    if body:
        out.append({"title": f"Where the quality goes: perplexity ratio of each step that made a deployed artifact "
                             f"({level} paired intervals, same held-out sequences)",
                    "header": ["training precision", "artifact", "step", "from → to", "perplexity ratio"], "rows": body})
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
    body = [[cell(p), cell(c["label"]), value_cell(data, f"{src}/ptq_perplexity"), value_cell(data, f"{src}/qat_perplexity"),
             value_cell(data, f"{src}/ratio", f"{src}/ratio_ci", "×"), value_cell(data, f"{src}/ptq_kl", f"{src}/ptq_kl_ci"),
             value_cell(data, f"{src}/qat_kl", f"{src}/qat_kl_ci"),
             value_cell(data, f"{src}/ptq_loss", f"{src}/ptq_loss_ci", "×"),
             value_cell(data, f"{src}/recovered", f"{src}/recovered_ci") if c["recovered"] is not None
             else cell("none: PTQ lost nothing significant"),
             value_cell(data, f"{src}/step_time_ratio", prefix="×")]
            for p in ordered(data["qat"]) for q, c in data["qat"][p].items() if (src := f"qat/{p}/{q}")]
    if body:
        out.append({"title": f"QAT against PTQ at the same deployed format ({level} paired intervals, same held-out "
                             "sequences; KL from the model trained without QAT)",
                    "header": ["training precision", "format", "PTQ perplexity", "QAT perplexity", "QAT / PTQ",
                               "PTQ KL", "QAT KL", "PTQ / trained", "fraction of PTQ's loss recovered",
                               "QAT step time / plain"],
                    "rows": body})
    training = [(p, f"rows/{p}/train") for p in ordered(rows)]
    training += [(f"{p}, {'no QAT' if q == NO_QAT else f'QAT {q}'}", f"qat_train/{p}/{q}")
                 for p in ordered(data["qat_train"]) for q in data["qat_train"][p]]
    if data["noise"]:
        training.append((f"fp32, seed {data['noise_seed']} (noise floor)", "noise/train"))
    out.append({"title": "Training", "header": ["training precision", "step time (s)", "tokens/s", "peak memory (MB)",
                                                 "held-out loss before", "held-out loss after", "skipped fp16 steps",
                                                 "compute dtype"],
                "rows": [[cell(p), *(value_cell(data, f"{src}/{k}") for k in (
                    "step_time_s", "tokens_per_s", "peak_memory_mb", "start_heldout_loss", "heldout_loss", "skipped_steps",
                    "compute_dtype"))] for p, src in training]})
    return out


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
