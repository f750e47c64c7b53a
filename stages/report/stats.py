"""The report's statistics and decision rule: paired perplexity ratios, verdicts against the noise
floor, speed differences that are significant or not, where each deployed artifact lost its
quality, the recommendation, and the gates."""

from __future__ import annotations

import math

import numpy as np
from omegaconf import DictConfig

from pipeline.formats import METHODS, NO_QAT, QAT, SMOOTHED
from pipeline.hardware import COMPARE, PRECISIONS
from pipeline.metrics import bootstrap_ci, percentile_interval, round_rate, round_replicates
from pipeline.contract import declared
from stages.report.collect import column

COMPARE_RUN = f"train.precision={COMPARE}"

GATE_METRICS = ("perplexity", "kl", "kl_vs_fp32", "top1", "perplexity_ratio_to_fp32", "size_mb",
                "ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50", "output_tokens_per_s")


def ordered(precisions) -> list[str]:
    return sorted(precisions, key=PRECISIONS.index)


def paired_ratio(a: dict, a_name: str, b: dict, b_name: str, resamples: int, confidence: float) -> dict | None:
    """Perplexity of a's artifact over b's, with a bootstrap interval that resamples the held-out
    sequences both were measured on (pairing removes most of the sequence-to-sequence spread)."""
    nll_a, nll_b = a["sequence_nll"].get(a_name), b["sequence_nll"].get(b_name)
    if nll_a is None or nll_b is None or a["sequence_tokens"] != b["sequence_tokens"]:
        return None
    diff, tokens = np.asarray(nll_a) - np.asarray(nll_b), np.asarray(a["sequence_tokens"], dtype=float)
    return {"ratio": float(np.exp(diff.sum() / tokens.sum())),
            "ratio_ci": list(bootstrap_ci(diff, tokens, resamples, confidence, transform=np.exp))}


def against_fp32(row: dict, name: str, fp32: dict, resamples: int, confidence: float) -> dict | None:
    """paired_ratio of a row's artifact over the fp32 row's; for the trained models, over every
    held-out sequence where the row's evaluation measured both (reference_pairs: its fp32 reference
    is the fp32 row's model where neither trained with QAT)."""
    pair = row.get("reference_pairs")
    plain = row["train"].get("qat", NO_QAT) == NO_QAT and fp32["train"].get("qat", NO_QAT) == NO_QAT
    if name == "trained" and plain and pair and "fp32" in pair["nll"]:
        ours, theirs = ({"sequence_nll": {name: pair["nll"][key]}, "sequence_tokens": pair["tokens"]} for key in (name, "fp32"))
        found = paired_ratio(ours, name, theirs, name, resamples, confidence)
        return found and {**found, "sequences": len(pair["tokens"])}
    return paired_ratio(row, name, fp32, name, resamples, confidence)


def verdict(comparison: dict, noise: float) -> str:
    """"worse" / "better" only beyond the noise floor; "no significant difference" only where the
    interval holds 1; an interval that excludes 1 but lies inside the floor is said to be so."""
    low, high = comparison["ratio_ci"]
    if low > 1 + noise:
        return "worse"
    if high < 1 - noise:
        return "better"
    if low <= 1 <= high:
        return "no significant difference"
    return f"within the seed-to-seed difference (±{noise:.1%})"


def below_source(comparison: dict | None) -> bool:
    """A deployed format whose perplexity is significantly lower than the model it was made from:
    quantization noise flattening an undertrained model's predictions, not a gain."""
    return comparison is not None and comparison["ratio_ci"][1] < 1


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
        found = {n: against_fp32(noise, n, fp32, resamples, confidence) for n in columns}
        out["noise"] = {n: c for n, c in found.items() if c}
    for precision, row in rows.items():
        if precision == "fp32":
            continue
        out["vs_fp32"][precision] = {}
        for name in columns:
            found = against_fp32(row, name, fp32, resamples, confidence)
            if found:
                floor = abs(out["noise"][name]["ratio"] - 1) if name in out["noise"] else 0.0
                out["vs_fp32"][precision][name] = {**found, "noise": floor, "verdict": verdict(found, floor)}
    return out


def qat_against_ptq(arms: dict, resamples: int, confidence: float) -> dict:
    """{precision: {qat: comparison}} of each QAT run's deployed artifact against post-training
    quantization of the same run without QAT, at the same format and on the same held-out sequences:
    the perplexity ratio (paired), both KLs from the model trained without QAT, the fraction of
    PTQ's perplexity loss that QAT recovered, and the step-time overhead. `arms`: {precision:
    {train.qat: row}}; a precision without both arms measured is left out."""
    out = {}
    for precision, by in arms.items():
        ptq = by.get(NO_QAT)
        for qat, row in by.items():
            if qat == NO_QAT or ptq is None:
                continue
            name = QAT[qat].column
            if name not in ptq["artifacts"] or name not in row["artifacts"]:
                continue
            versus = paired_ratio(row, name, ptq, name, resamples, confidence)
            if versus is None:
                continue
            tokens = np.asarray(ptq["sequence_tokens"], dtype=float)
            nll = np.stack([np.asarray(ptq["sequence_nll"]["trained"]), np.asarray(ptq["sequence_nll"][name]),
                            np.asarray(row["sequence_nll"][name])])
            picks = np.random.default_rng(0).integers(0, len(tokens), size=(resamples, len(tokens)))
            # Perplexity of the model without QAT, of its PTQ artifact and of QAT's: point, then replicates.
            full, post, aware = np.exp(nll.sum(-1) / tokens.sum())
            replicates = np.exp(nll[:, picks].sum(-1) / tokens[picks].sum(-1))
            ptq_cell, qat_cell = ptq["artifacts"][name], row["artifacts"][name]
            # A fraction of PTQ's loss only where there is one: an interval that holds 1 has none to recover.
            loss = paired_ratio(ptq, name, ptq, "trained", resamples, confidence)
            fraction = {"recovered": None, "recovered_ci": None}
            if loss["ratio_ci"][0] > 1:
                fraction = {"recovered": float((post - aware) / (post - full)),
                            "recovered_ci": percentile_interval((replicates[1] - replicates[2]) /
                                                                (replicates[1] - replicates[0]), confidence)}
            out.setdefault(precision, {})[qat] = {
                "artifact": name, "label": QAT[qat].label, **versus,
                "verdict": verdict(versus, 0.0),
                "ptq_perplexity": ptq_cell["perplexity"], "qat_perplexity": qat_cell["perplexity"],
                "trained_perplexity": ptq["artifacts"]["trained"]["perplexity"],
                "ptq_kl": ptq_cell["kl"], "ptq_kl_ci": ptq_cell["kl_ci"],
                "qat_kl": qat_cell.get("kl_vs_no_qat"), "qat_kl_ci": qat_cell.get("kl_vs_no_qat_ci"),
                "ptq_loss": loss["ratio"], "ptq_loss_ci": loss["ratio_ci"], **fraction,
                "step_time_ratio": (row["train"]["step_time_s"] / ptq["train"]["step_time_s"]
                                    if row["train"].get("step_time_s") and ptq["train"].get("step_time_s") else None),
            }
    return out


def lineage(name: str) -> list[tuple[str, str, str]]:
    """(step, from, to) that made a deployed artifact from the model as trained, each a pair of
    artifacts measured on the same held-out sequences (a step whose ends were not both measured,
    such as the LoRA merge of a full fine-tune, is left out by the caller); empty for one made
    elsewhere (evaluate.extra)."""
    source, _, kind = column(name).rpartition(".")
    # With LoRA, the trained model is the merged one: the model with its adapter unmerged came first.
    merge = [("LoRA merge", declared("evaluate").names["unmerged"], "trained")]
    if not source:
        return [*merge, (METHODS[name].label, "trained", name)] if name in METHODS else []
    if source not in ("trained", SMOOTHED):
        return []
    steps = [*merge, ("conversion to GGUF", "trained", "trained.16bit")]
    if source == SMOOTHED:
        steps.append(("AWQ smoothing", "trained.16bit", f"{SMOOTHED}.16bit"))
    plain = kind.removesuffix(f"-{declared('export').names['imatrix']}")
    if kind != "16bit":
        steps.append(("quantization", f"{source}.16bit", f"{source}.{plain}"))
    if plain != kind:  # the same type quantized with llama.cpp's importance matrix, paired with the file without
        steps.append(("importance matrix", f"{source}.{plain}", name))
    return steps


def waterfall(rows: dict, columns: list[str], resamples: int, confidence: float) -> dict:
    """{precision: {artifact: [steps]}}: the perplexity ratio each step that made the artifact
    contributed, from the fp32-trained model (the precision step, where both were run) to the
    artifact, each paired on the same held-out sequences. A step whose two ends were not both
    measured is left out."""
    out = {}
    for precision, row in rows.items():
        start = []
        if precision != "fp32" and "fp32" in rows:
            found = paired_ratio(row, "trained", rows["fp32"], "trained", resamples, confidence)
            start = [{"step": "training precision", "from": "fp32 trained", "to": f"{precision} trained", **found}] if found else []
        by_artifact = {}
        for name in columns:
            steps = [{"step": step, "from": a, "to": b, **found} for step, a, b in lineage(name)
                     if (found := paired_ratio(row, b, row, a, resamples, confidence))]
            if start or steps:
                by_artifact[name] = start + steps
        out[precision] = by_artifact
    return out


def speed_ratio(a: dict, b: dict, resamples: int, confidence: float) -> dict | None:
    """a's served output-token rate over b's, with an interval; None where either lacks per-round
    values. Over several rounds, a t interval of the rounds' log ratios (round r of one beside round r
    of the other, measured close in time): what varies between rounds, a machine's load included,
    is what decides, and few rounds make the interval wide, as they should. From one round, a
    bootstrap over each one's requests, which no change of load between the two runs widens."""
    from scipy.stats import t

    rounds = [cell.get("speed_rounds") or [] for cell in (a, b)]
    if not rounds[0] or len(rounds[0]) != len(rounds[1]) or any(len(r["latency_s"]) < 2 for r in rounds[0] + rounds[1]):
        return None
    point = a["output_tokens_per_s"] / b["output_tokens_per_s"]
    if len(rounds[0]) > 1:
        logs = np.log([ra["rate"] / rb["rate"] for ra, rb in zip(*rounds)])
        half = t.ppf(0.5 + confidence / 2, len(logs) - 1) * logs.std(ddof=1) / np.sqrt(len(logs))
        return {"ratio": point, "ratio_ci": [float(np.exp(logs.mean() - half)), float(np.exp(logs.mean() + half))]}
    replicates = [round_replicates([{k: r[k] for k in ("output_tokens", "latency_s")} for r in found],
                                   {"rate": round_rate(found)}, resamples, seed)["rate"] for seed, found in enumerate(rounds)]
    return {"ratio": point, "ratio_ci": percentile_interval(replicates[0] / replicates[1], confidence)}


def faster(a: dict, b: dict, resamples: int, confidence: float) -> bool:
    """Whether a serves significantly faster than b: the interval of their rates' ratio lies above 1."""
    found = speed_ratio(a, b, resamples, confidence)
    return found is not None and found["ratio_ci"][0] > 1


def pareto_front(points: list[dict], is_faster) -> list[dict]:
    """Points no other beats, by x (throughput, higher) and y (quality loss, lower): another beats a
    point when its loss is no higher and it is significantly faster (`is_faster(q, p)`), or when its
    loss is lower and it is not significantly slower. Sorted by throughput."""
    def beats(q, p):
        return q is not p and q["y"] <= p["y"] and (is_faster(q, p) or (q["y"] < p["y"] and not is_faster(p, q)))

    return sorted((p for p in points if not any(beats(q, p) for q in points)), key=lambda p: (p["x"], p["y"]))


def fastest_within(row: dict, budget: float, resamples: int, confidence: float) -> dict | None:
    """The served format with the highest throughput whose KL from its own trained model is within
    budget; where others are not significantly slower, they are ≈ in speed and the smallest file
    of them is picked. None where no served format fits."""
    fitting = [(n, c) for n, c in row["artifacts"].items()
               if c.get("output_tokens_per_s") and c.get("kl") is not None and c["kl"] <= budget]
    if not fitting:
        return None
    best = max(fitting, key=lambda nc: nc[1]["output_tokens_per_s"])
    tied = [(n, c) for n, c in fitting if n == best[0] or not faster(best[1], c, resamples, confidence)]
    pick = min(tied, key=lambda nc: nc[1].get("size_mb", math.inf)) if len(tied) > 1 else best
    return {"format": pick[0], "cell": pick[1], "same_speed": [n for n, _ in tied] if len(tied) > 1 else [],
            "within": len(fitting)}


def decide(rows: dict, comparisons: dict, r: DictConfig, cfg: DictConfig) -> dict:
    """The recommendation, or why there is none and what to run; every reason names its numbers."""
    sweep = f"python -m pipeline -m train.precision={','.join(ordered(set(r.precisions) | {'fp32'}))} stage=all"
    noise_run = (f"python -m pipeline 'stage=[train,quantize,export,evaluate]' train.precision=fp32 seed={r.noise_seed} "
                 f"evaluate.reference_seed={cfg.seed}")
    others = [p for p in ordered(r.precisions) if p not in rows]
    if set(rows) == {"fp32"} and comparisons["noise"] and others:
        # What train.precision=compare leaves on a machine that trains nothing else natively (a CPU
        # without AVX512-BF16 or AMX): fp32 is the answer there, and what the others cost is unmeasured.
        return {"status": "provisional", "precision": "fp32", "passing": ["fp32"], "alone": True,
                "reasons": [f"it is the only training precision run with these settings: {', '.join(others)} "
                            f"{'was' if len(others) == 1 else 'were'} not (train.precision=compare trains those this "
                            f"machine runs natively), so what {'it costs' if len(others) == 1 else 'they cost'} the "
                            f"deployed model is not measured; `{sweep}` runs {'it' if len(others) == 1 else 'them'} "
                            "all the same."]}
    if len(rows) == 1:
        return {"status": "none", "reasons": [f"only {next(iter(rows))} was run with these settings. "
                                              f"`python -m pipeline {COMPARE_RUN}` (the default of a pretrained model) "
                                              "adds the cross-precision comparison: each precision this machine trains "
                                              f"natively, the fp32 noise floor and the report; `{sweep}` trains every "
                                              "precision all the same."]}
    if "fp32" not in rows:
        return {"status": "none", "reasons": [f"there is no fp32-trained model to compare against: run `{sweep}` "
                                              "(or `make compare`)."]}
    sequences = len(rows["fp32"]["sequence_tokens"])
    reasons = []
    if 0 < sequences < r.min_sequences:
        reasons.append(f"only {sequences} held-out sequences were evaluated (report.min_sequences={r.min_sequences}): "
                       f"raise evaluate.max_sequences to at least {r.min_sequences}.")
    wide = [f"{p} at {n} ({c['ratio_ci'][0]:.3f}-{c['ratio_ci'][1]:.3f})" for p, by in comparisons["vs_fp32"].items()
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
                                   f"`python -m pipeline stage=report` (`python -m pipeline {COMPARE_RUN}` runs it all).")
    return decision


def deployable(rows: dict, decision: dict, budget: float, resamples: int, confidence: float) -> dict:
    """What to hand to deployment: the recommended precision's fastest served format within the KL
    budget (report.deploy_kl), or why there is nothing to hand over."""
    if decision["status"] == "none":
        return {"reason": "no training precision is recommended (see above)"}
    precision = decision["precision"]
    found = fastest_within(rows[precision], budget, resamples, confidence)
    if found is None:
        return {"reason": f"no served format of the {precision}-trained model has a KL within report.deploy_kl={budget}"}
    why = ("the only served format" if found["within"] == 1 else
           "the smallest file of the served formats ≈ in speed" if found["same_speed"] else
           "the served format significantly faster than the others")
    return {"precision": precision, "format": found["format"], "decision": decision["status"], "kl_budget": budget,
            "why": why}


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
