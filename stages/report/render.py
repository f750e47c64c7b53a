"""The report's plots: what each draws (every point with the path of its numbers in report.json),
and the drawing. Precision is the colour, format the marker."""

from __future__ import annotations

import math
from pathlib import Path

from pipeline.hardware import PRECISION_TABLE
from stages.report.stats import ordered, pareto_front

NOISE = "noise"  # the fp32 run at report.noise_seed
COLOURS = {**{p: meaning.colour for p, meaning in PRECISION_TABLE.items()}, NOISE: "tab:gray"}
MARKERS = "osD^vP*X<>hp"
STEP_COLOURS = ("tab:purple", "tab:cyan", "tab:olive", "tab:brown", "tab:pink", "tab:gray")
TITLES = {"loss_curves": "Loss per training precision", "quality_vs_throughput": "Quality against served throughput",
          "perplexity_by_format": "Held-out perplexity per deployed format",
          "kl_vs_fp32": "Divergence from the fp32-trained model, beside two fp32 seeds'",
          "waterfall": "Where the quality goes: perplexity change per step that made each artifact"}


def plot_data(data: dict, columns: list[str], quality: str, is_faster) -> dict:
    """What each plot draws, every point with the path of its numbers in report.json. A plot with
    nothing measured to draw is left out. `is_faster(a, b)`: a serves significantly faster than b."""
    rows, noise = data["rows"], data["noise"]
    series = [(p, f"rows/{p}", rows[p]) for p in ordered(rows)] + ([(NOISE, "noise", noise)] if noise else [])
    out = {}
    curves = [{"precision": p, "kind": kind, "points": row["train"]["history"][kind], "source": f"{src}/train/history/{kind}"}
              for p, src, row in series for kind in ("train_loss", "eval_loss") if row["train"].get("history", {}).get(kind)]
    if curves:
        out["loss_curves"] = {"xlabel": "step", "ylabel": "loss", "series": curves}
    points = [{"precision": p, "format": n, "x": c["output_tokens_per_s"], "y": c[quality], "x_ci": c.get("output_tokens_per_s_ci"),
               "served_by": c.get("served_by"),
               "source_x": f"rows/{p}/artifacts/{n}/output_tokens_per_s", "source_y": f"rows/{p}/artifacts/{n}/{quality}"}
              for p in ordered(rows) for n, c in rows[p]["artifacts"].items()
              if c.get("output_tokens_per_s") and c.get(quality) is not None]
    if points:
        cells = {(q["precision"], q["format"]): rows[q["precision"]]["artifacts"][q["format"]] for q in points}
        fronts = {p: pareto_front([q for q in points if q["precision"] == p],
                                  lambda a, b: is_faster(cells[a["precision"], a["format"]], cells[b["precision"], b["format"]]))
                  for p in ordered(rows)}
        out["quality_vs_throughput"] = {"xlabel": f"output tokens/s served ({data['serve_level']})",
                                        "ylabel": "KL from its own trained model" if quality == "kl" else "held-out perplexity",
                                        "points": points,
                                        "fronts": {p: [[q["x"], q["y"]] for q in f] for p, f in fronts.items() if f}}
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
    bars = [{"precision": p, "format": n, "step": s["step"], "y": s["ratio"], "ci": s["ratio_ci"],
             "source_y": f"waterfall/{p}/{n}/{i}/ratio"}
            for p in ordered(data["waterfall"]) for n, steps in data["waterfall"][p].items() for i, s in enumerate(steps)]
    if bars:
        # The first step is the training precision's only where the fp32 arm was run too.
        start = "the fp32-trained model" if "fp32" in data["waterfall"] else "the trained model"
        out["waterfall"] = {"xlabel": f"change of held-out log-perplexity from {start} (100 x log ratio, %; steps add up)",
                            "ylabel": "", "bars": bars}
    return out


def _waterfall(ax, plot: dict) -> None:
    """One row per artifact: each step a bar from the running total to the total after it, in
    percent of log-perplexity (which adds up), with its interval at the bar's end."""
    from matplotlib.patches import Patch

    labels = list(dict.fromkeys((b["precision"], b["format"]) for b in plot["bars"]))
    steps = list(dict.fromkeys(b["step"] for b in plot["bars"]))
    totals = dict.fromkeys(labels, 0.0)
    for bar in plot["bars"]:
        key = (bar["precision"], bar["format"])
        y, start, change = labels.index(key), totals[key], 100 * math.log(bar["y"])
        ax.barh(y, change, left=start, color=STEP_COLOURS[steps.index(bar["step"]) % len(STEP_COLOURS)], height=0.6)
        low, high = (100 * math.log(v) for v in bar["ci"])
        ax.errorbar(start + change, y, xerr=[[change - low], [high - change]], color="black", capsize=2, lw=0.8)
        totals[key] = start + change
    ax.axvline(0, color="black", lw=0.5)
    ax.set_yticks(range(len(labels)), [f"{p} {n}" if len({p for p, _ in labels}) > 1 else n for p, n in labels], fontsize=7)
    ax.invert_yaxis()
    ax.legend(handles=[Patch(color=STEP_COLOURS[i % len(STEP_COLOURS)], label=s) for i, s in enumerate(steps)], fontsize=7,
              loc="center left", bbox_to_anchor=(1.01, 0.5))


def render(plots: dict, folder: Path, noise_seed: int) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    name = {NOISE: f"fp32 seed {noise_seed} (noise floor)"}
    made = []
    for key, plot in plots.items():
        rows = len({(b["precision"], b["format"]) for b in plot.get("bars", [])})
        fig, ax = plt.subplots(figsize=(8, max(4.5, 0.35 * rows + 1.5)))
        if key == "waterfall":
            _waterfall(ax, plot)
        elif key == "loss_curves":
            for s in plot["series"]:
                ax.plot(*zip(*s["points"]), "-" if s["kind"] == "train_loss" else "--", color=COLOURS[s["precision"]],
                        label=f"{name.get(s['precision'], s['precision'])} {s['kind'].replace('_', ' ')}")
            ax.legend(fontsize=7)
        else:
            formats = list(dict.fromkeys(q["format"] for q in plot["points"]))
            precisions = list(dict.fromkeys(q["precision"] for q in plot["points"]))
            marker = {f: MARKERS[i % len(MARKERS)] for i, f in enumerate(formats)}
            for q in plot["points"]:
                colour = COLOURS[q["precision"]]
                if key == "quality_vs_throughput":
                    xerr = [[q["x"] - q["x_ci"][0]], [q["x_ci"][1] - q["x"]]] if q.get("x_ci") else None
                    ax.errorbar(q["x"], q["y"], xerr=xerr, color=colour, marker=marker[q["format"]], capsize=3, ls="")
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
            served_by = {q["format"]: q["served_by"] for q in plot["points"] if q.get("served_by")}
            handles += [Line2D([], [], color="black", marker=marker[f], ls="",
                               label=f"{f} on {served_by[f]}" if f in served_by else f) for f in formats]
            if plot.get("fronts"):
                handles.append(Line2D([], [], color="black", ls=":", label="Pareto front (significant differences only)"))
            ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        ax.set(xlabel=plot.get("xlabel", ""), ylabel=plot["ylabel"], title=TITLES[key])
        fig.tight_layout()
        fig.savefig(folder / f"{key}.png", dpi=110)
        plt.close(fig)
        made.append(folder / f"{key}.png")
    return made
