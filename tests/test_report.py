"""report: built from real runs of the offline default (one precision, then two, then with the fp32
noise floor), asserted on its headline, its tables and the data behind its plots; and its decision
rules on fabricated numbers."""

import base64
import math
import shutil
from html.parser import HTMLParser
from types import SimpleNamespace

import numpy as np
import pytest
from omegaconf import OmegaConf

from pipeline import hardware
from pipeline.compare import ALONE_NOISE_STAGES, NOISE_STAGES
from pipeline.artifacts import read_json, stage_dir
from stages.report.render import NOISE, plot_data
from stages.report.register import registering
from stages.report.stats import compare, decide, deployable, gate_results, paired_ratio, pareto_front, verdict
from stages.report.text import budget_line, deploy_lines, fmt, gate_line, grid_lines, lookup, training_checks
from stages.train import got_worse
from tests.conftest import SMALL_CHAIN, compose_with, mlflow_client, only_dir, pipeline, refused, replace, runs

CHAIN = SMALL_CHAIN
NOISE_RUN = ["stage=[train,quantize,export,evaluate]", "train.precision=fp32", "seed=1", "evaluate.reference_seed=0"]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def reports(chain, tmp_path_factory):
    """The report after each of three steps a user takes, copied aside: one fp32 chain (the
    shared chain's outputs, reused); a bf16 chain beside it; the fp32 noise-floor run at seed 1."""
    cwd, kept = tmp_path_factory.mktemp("reports"), tmp_path_factory.mktemp("kept")
    shutil.copytree(chain / "artifacts", cwd / "artifacts", symlinks=True)

    def keep(name):
        shutil.copytree(only_dir(cwd / "artifacts" / "report"), kept / name)
        return kept / name

    pipeline(cwd, "stage=all", *CHAIN)
    single = keep("single")
    pipeline(cwd, "stage=all", *replace(CHAIN, "train.precision=bf16"))
    pair = keep("pair")
    pipeline(cwd, *replace(CHAIN, *NOISE_RUN))
    pipeline(cwd, "stage=report", *CHAIN)
    return SimpleNamespace(cwd=cwd, single=single, pair=pair, noise=keep("noise"))


def assert_every_value_has_its_source(data):
    """Each number in a table cell or a plot is the measurement its source path names."""
    for table in data["tables"]:
        labels = {"format": 2, "artifact": 4}.get(table["header"][1], 1)  # leading cells that name, not measure
        for row in table["rows"]:
            for i, c in enumerate(row):
                if c["source"] is not None:
                    value = lookup(data, c["source"])
                    shown = (fmt(value), f"{value:.4f}") if isinstance(value, float) else (fmt(value),)
                    assert value is not None and any(v in c["text"] for v in shown), (table["title"], c)
                else:  # a label, or a value that was not measured: empty, never a placeholder
                    assert i < labels or c["text"] == "", (table["title"], c)
    for plot in data["plots"].values():
        for s in plot.get("series", []):
            assert s["points"] and lookup(data, s["source"]) == s["points"]
        for point in plot.get("points", []) + plot.get("bars", []):
            assert lookup(data, point["source_y"]) == point["y"]
            if "source_x" in point:
                assert lookup(data, point["source_x"]) == point["x"]


def plotted_precisions(data):
    return {q["precision"] for plot in data["plots"].values()
            for q in plot.get("points", []) + plot.get("series", []) + plot.get("bars", [])}


def table_precisions(data):
    return {row[0]["text"] for t in data["tables"] for row in t["rows"]}


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.tables = [], 0

    def handle_starttag(self, tag, attrs):
        self.tables += tag == "table"
        if tag == "img":
            self.images.append(dict(attrs)["src"])


def assert_plots_embedded(report, data):
    page = Page()
    page.feed((report / "report.html").read_text())
    assert len(page.images) == len(data["plots"]) and page.tables == len(data["tables"])
    for src in page.images:
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG)
    for name in data["plots"]:
        assert (report / f"{name}.png").read_bytes().startswith(PNG)


@pytest.mark.slow
def test_one_precision_report_shows_only_that_precision(reports):
    data = read_json(reports.single / "report.json")
    assert set(data["rows"]) == {"fp32"} and data["noise"] is None
    assert plotted_precisions(data) == {"fp32"} and table_precisions(data) == {"fp32"}
    assert set(data["plots"]) == {"loss_curves", "quality_vs_throughput", "perplexity_by_format", "waterfall"}
    assert all(plot.get("points") or plot.get("series") or plot.get("bars") for plot in data["plots"].values())
    assert_every_value_has_its_source(data)
    assert_plots_embedded(reports.single, data)
    # Quality against the run's own trained model, speed per served format, a Pareto front.
    own = data["comparisons"]["own"]["fp32"]
    assert {"trained.q8_0", "trained.q4_k_m", "awq"} <= set(own)
    served = {q["format"] for q in data["plots"]["quality_vs_throughput"]["points"]}
    assert served == {"trained.q4_k_m"} and data["plots"]["quality_vs_throughput"]["fronts"]["fp32"]

    markdown = (reports.single / "report.md").read_text()
    lines = markdown.splitlines()
    assert lines[2].startswith("- **fp32**: training step") and " tokens/s, peak memory " in lines[2]
    line = next(x for x in lines if x.startswith("  - trained.q4_k_m: perplexity ×"))
    assert "tokens/s served" in line and "TTFT p50" in line
    assert "Fastest deployed format of the fp32-trained model per quality budget" in markdown
    assert sum("adds the cross-precision comparison" in line for line in lines) == 1
    assert "not run" not in markdown and "n/a" not in markdown


@pytest.mark.slow
def test_two_precision_report_compares_pairwise_and_says_what_is_missing(reports):
    data = read_json(reports.pair / "report.json")
    assert set(data["rows"]) == {"fp32", "bf16"} and data["noise"] is None
    assert plotted_precisions(data) == {"fp32", "bf16"} and table_precisions(data) == {"fp32", "bf16"}
    assert "kl_vs_fp32" not in data["plots"]  # divergence from fp32 only beside the noise floor
    assert not any("KL divergence from the fp32" in t["title"] for t in data["tables"])
    assert_every_value_has_its_source(data)
    assert_plots_embedded(reports.pair, data)

    # The paired ratio is the ratio of the two perplexities the evaluate stage measured: for each
    # format on the artifacts' sequences; for the trained models on every held-out sequence, which
    # the bf16 run's evaluation measured both of them on.
    rows, by_format = data["rows"], data["comparisons"]["vs_fp32"]["bf16"]
    assert set(by_format) == set(data["columns"])
    for name, c in by_format.items():
        expected = rows["bf16"]["artifacts"][name]["perplexity"] / rows["fp32"]["artifacts"][name]["perplexity"]
        if name == "trained":
            pair = rows["bf16"]["reference_pairs"]
            expected = math.exp((sum(pair["nll"]["trained"]) - sum(pair["nll"]["fp32"])) / sum(pair["tokens"]))
            assert c["sequences"] == len(pair["tokens"]) > len(rows["bf16"]["sequence_tokens"])
        assert c["ratio"] == pytest.approx(expected, rel=1e-9)
        assert c["ratio_ci"][0] <= c["ratio"] <= c["ratio_ci"][1] and c["noise"] == 0
        assert c["verdict"] == verdict(c, 0)

    markdown = (reports.pair / "report.md").read_text()
    assert markdown.count("fp16: not run with these settings.") == 1 and "n/a" not in markdown
    decision = data["decision"]
    if decision["status"] == "provisional":  # the rule picks; the missing noise floor is named
        assert f"**Provisional recommendation: train in {decision['precision']}**" in markdown
        assert "evaluate.reference_seed=0" in markdown
    else:
        assert decision["status"] == "none" and "**No recommendation**" in markdown and decision["reasons"]


@pytest.mark.slow
def test_noise_floor_comes_from_a_real_second_fp32_run(reports):
    data = read_json(reports.noise / "report.json")
    noise, fp32 = data["noise"], data["rows"]["fp32"]
    assert data["noise_seed"] == 1 and noise["train"]["history"] != fp32["train"]["history"]
    floor = data["comparisons"]["noise"]
    assert set(floor) == set(data["columns"]) and floor["trained"]["ratio"] != 1
    assert noise["artifacts"]["trained"]["kl_vs_fp32"] > 0
    assert_every_value_has_its_source(data)
    assert_plots_embedded(reports.noise, data)

    # Divergence from fp32 is drawn beside the noise floor; fp32 against itself is a true zero.
    points = data["plots"]["kl_vs_fp32"]["points"]
    assert {q["precision"] for q in points} == {"fp32", "bf16", NOISE}
    assert next(q["y"] for q in points if q["precision"] == "fp32" and q["format"] == "trained") == 0
    for c in data["comparisons"]["vs_fp32"]["bf16"].values():
        assert c["noise"] > 0  # every format is judged against its own floor
    decision = data["decision"]
    if decision["status"] == "recommended":
        assert f"**Recommendation: train in {decision['precision']}**" in "\n".join(data["headline"])
        assert decision["precision"] in decision["passing"]
    markdown = (reports.noise / "report.md").read_text()
    assert "- **Noise floor**, fp32 at seed 1 against fp32 at the main seed" in markdown


@pytest.mark.slow
def test_one_command_runs_each_precision_the_noise_floor_and_the_report(reports, tmp_path):
    """train.precision=compare runs what the steps above ran, as the same runs: every stage's output
    is found at the address those runs gave it, and the report is theirs. It trains the precisions
    this machine runs natively: fp32 and bf16 where it has bf16 instructions, else fp32 alone (what
    the report says then is tested on fabricated numbers below)."""
    shutil.copytree(reports.cwd / "artifacts", tmp_path / "artifacts", symlinks=True)  # the outputs, a fresh store
    overrides = [*replace(CHAIN, "train.precision=compare"), "report.precisions=[fp32,bf16]"]
    result = pipeline(tmp_path, "stage=all", *overrides)
    compared = stage_dir(compose_with(*overrides, f"paths.artifacts={tmp_path}/artifacts"), "report")
    precisions, left_out = hardware.compared_precisions(["fp32", "bf16"], hardware.detect())
    console, parts = result.stderr, [*precisions, "noise floor (fp32 at seed 1)", "report"]
    assert (f"comparing training precisions {', '.join(precisions)} with the fp32 noise floor: {len(parts)} runs"
            + "".join(f"; {p} left out: {why}" for p, why in left_out.items())) in console
    titles = [line for line in console.splitlines() if line.startswith("== ")]
    assert titles == [f"== {n}/{len(parts)}: {title}" for n, title in enumerate(parts, 1)]
    assert " done in " not in console.split(f"== {len(parts)}/")[0]  # before the report, all reused
    # The noise floor's stages: through evaluate, or its trained model alone where fp32 is all there is.
    noise_stages = NOISE_STAGES if len(precisions) > 1 else ALONE_NOISE_STAGES
    assert console.count(": reusing ") == 6 * len(precisions) + len(noise_stages)
    compared, noise = (read_json(path / "report.json") for path in (compared, reports.noise))
    # The report reads every precision of report.precisions run with these settings: bf16's outputs
    # are there whether or not this machine's comparison trained it.
    assert compared["rows"] == noise["rows"] and compared["comparisons"] == noise["comparisons"]
    assert compared["decision"] == noise["decision"] and compared["decision"]["status"] != "provisional"
    for name in [f"tiny-{p}" for p in precisions] + ["tiny-fp32-seed1", "tiny-report"]:
        assert runs(tmp_path, name)[-1].info.status == "FINISHED", name


@pytest.mark.slow
def test_report_run_carries_the_answer_and_the_plots(reports):
    client = mlflow_client(reports.cwd)
    report_run = runs(reports.cwd, "report")[-1]
    data = read_json(reports.noise / "report.json")
    assert report_run.data.tags["mlflow.note.content"] == "\n".join(data["headline"])
    logged = {a.path for a in client.list_artifacts(report_run.info.run_id, "report")}
    assert {f"report/{name}.png" for name in data["plots"]} <= logged and "report/report.html" in logged


@pytest.mark.slow
def test_report_from_mlflow_run_ids_matches_the_artifacts(reports, tmp_path):
    by_artifacts = read_json(reports.noise / "report.json")
    trained = [r for r in runs(reports.cwd) if "train" in r.data.tags.get("stages", "").split(",")]
    by_seed = {(r.data.params["train.precision"], r.data.params["seed"]): r.info.run_id for r in trained}
    ids = [by_seed["fp32", "0"], by_seed["bf16", "0"], by_seed["fp32", "1"]]
    # A copy of the store; the report's own run goes to an experiment (and artifacts) of its own.
    shutil.copy(reports.cwd / "mlflow.db", tmp_path / "mlflow.db")
    pipeline(tmp_path, "stage=report", *replace(CHAIN, f"report.runs=[{','.join(ids)}]"), "tracking.experiment=by-ids")
    by_runs = read_json(only_dir(tmp_path / "artifacts" / "report") / "report.json")
    assert "MLflow runs:" in by_runs["notes"][0]
    for precision in ("fp32", "bf16"):
        for name in ("trained", "awq", "trained.q4_k_m", "awq_smoothed.16bit"):
            ours, theirs = by_runs["rows"][precision]["artifacts"][name], by_artifacts["rows"][precision]["artifacts"][name]
            for key in ("perplexity", "kl", "kl_vs_fp32", "top1"):
                assert ours[key] == pytest.approx(theirs[key], rel=1e-6), (precision, name, key)
        assert by_runs["rows"][precision]["artifacts"]["trained.q4_k_m"]["ttft_ms_p50"] == pytest.approx(
            by_artifacts["rows"][precision]["artifacts"]["trained.q4_k_m"]["ttft_ms_p50"])
    assert by_runs["comparisons"]["noise"]["trained"]["ratio"] == pytest.approx(
        by_artifacts["comparisons"]["noise"]["trained"]["ratio"], rel=1e-9)
    assert by_runs["decision"]["status"] == by_artifacts["decision"]["status"]


@pytest.mark.slow
def test_tight_gate_fails_with_the_list_and_loose_gate_passes(reports, tmp_path):
    shutil.copytree(reports.cwd / "artifacts", tmp_path / "artifacts", symlinks=True)  # the outputs, a fresh store
    measured = read_json(reports.noise / "report.json")["rows"]["bf16"]["artifacts"]["trained.q4_k_m"]["kl"]
    tight = f"report.gates=[{{artifact: trained.q4_k_m, metric: kl, max: {measured / 2}, precision: bf16}}]"
    result = pipeline(tmp_path, "stage=report", *replace(CHAIN, tight), check=False)
    assert result.returncode != 0
    assert "1 quality gate(s) failed" in result.stderr
    assert f"FAIL: bf16 trained.q4_k_m kl = {measured:.2e}" in result.stderr
    loose = (f"report.gates=[{{artifact: trained.q4_k_m, metric: kl, max: {measured * 2}}}, "
             "{artifact: trained, metric: perplexity_ratio_to_fp32, max: 2}]")
    pipeline(tmp_path, "stage=report", *replace(CHAIN, loose))
    gates = read_json(stage_dir(compose_with(*replace(CHAIN, loose), f"paths.artifacts={tmp_path}/artifacts"), "report")
                      / "gates.json")
    # fp16 is in report.precisions but was not run: its gates are skipped, never failed.
    assert [g["status"] for g in gates] == ["pass", "pass", "skipped"] * 2


def test_bad_gate_is_refused_before_work(tmp_path):
    assert "metric (one of perplexity, kl" in refused(tmp_path, "report.gates=[{artifact: trained, metric: speed, max: 1}]")


def test_noise_seed_equal_to_the_seed_is_refused(tmp_path):
    assert "report.noise_seed=1 equals seed=1" in refused(tmp_path, "seed=1", "report.noise_seed=1")


def test_two_seeds_give_two_outputs_in_the_fixed_layout():
    cfgs = [compose_with("paths.fixed=dvc", f"seed={s}") for s in (0, 1)]
    for stage in ("train", "quantize", "export", "evaluate", "serve", "report"):
        assert stage_dir(cfgs[0], stage) != stage_dir(cfgs[1], stage), stage
    noise = compose_with("paths.fixed=dvc", "seed=1", "evaluate.reference_seed=0")
    assert stage_dir(noise, "evaluate") != stage_dir(cfgs[1], "evaluate")
    assert stage_dir(noise, "train") == stage_dir(cfgs[1], "train")


# The rules on fabricated numbers: every branch, in milliseconds.

def fake_row(nll_per_token: dict, step_time: float, sequences: int = 30, tokens: int = 100, spread: float = 0.05):
    rng = np.random.default_rng(int(step_time * 1000))
    artifacts, sequence_nll = {}, {}
    for name, level in nll_per_token.items():
        per_sequence = tokens * (level + spread * rng.standard_normal(sequences))
        sequence_nll[name] = per_sequence.tolist()
        artifacts[name] = {"perplexity": math.exp(per_sequence.sum() / (tokens * sequences)), "kl": level - 3,
                           "kl_ci": [0, 1], "top1": 0.9, "size_mb": 1.0}
    return {"train": {"step_time_s": step_time, "history": {"train_loss": [[1, 5.0]]}}, "artifacts": artifacts,
            "sequence_nll": sequence_nll, "sequence_tokens": [tokens] * sequences}


REPORT = OmegaConf.create({"precisions": ["fp32", "bf16", "fp16"], "noise_seed": 1, "min_sequences": 20,
                           "max_interval_width": 0.1, "kl_budgets": [0.01], "serve_level": "c1"})
SEED = OmegaConf.create({"seed": 0})


def test_paired_ratio_matches_the_perplexity_ratio_and_its_interval_narrows_with_pairing():
    a, b = fake_row({"trained": 3.0}, 0.2), fake_row({"trained": 3.0}, 0.3)
    b["sequence_nll"]["trained"] = [x + 1.0 for x in a["sequence_nll"]["trained"]]  # one nat more per sequence
    found = paired_ratio(b, "trained", a, "trained", 500, 0.95)
    assert found["ratio"] == pytest.approx(math.exp(30 / 3000))
    assert found["ratio_ci"] == pytest.approx([found["ratio"]] * 2)  # a constant shift has no spread
    a["sequence_tokens"] = a["sequence_tokens"][:-1] + [99]
    assert paired_ratio(b, "trained", a, "trained", 500, 0.95) is None  # different sequences never pair


def test_the_noise_floor_of_the_trained_models_pairs_them_on_every_held_out_sequence():
    fp32, noise = fake_row({"trained": 3.0, "q4": 3.1}, 0.2), fake_row({"trained": 3.2, "q4": 3.3}, 0.21)
    assert compare({"fp32": fp32}, noise, ["trained", "q4"], 300, 0.95)["noise"]["trained"]["ratio"] > 1.1
    # The noise run's evaluation measured both trained models on more sequences: those pair them.
    noise["reference_pairs"] = {"tokens": [50] * 120, "nll": {"trained": [150.0] * 120, "fp32": [149.0] * 120}}
    found = compare({"fp32": fp32}, noise, ["trained", "q4"], 300, 0.95)["noise"]
    assert found["trained"]["ratio"] == pytest.approx(math.exp(1 / 50))
    assert found["q4"] == paired_ratio(noise, "q4", fp32, "q4", 300, 0.95)  # the formats: on the rows' sequences
    noise["train"]["qat"] = "q4_0"  # a QAT run's fp32 reference is the model without QAT, not the fp32 row's
    assert compare({"fp32": fp32}, noise, ["trained"], 300, 0.95)["noise"]["trained"]["ratio"] > 1.1


def test_verdict_counts_the_noise_floor_and_says_which_side_of_1_it_is():
    assert verdict({"ratio_ci": [1.02, 1.04]}, 0) == "worse"
    # The interval excludes 1 but lies inside the noise band: not "no significant difference".
    assert verdict({"ratio_ci": [1.02, 1.04]}, 0.05) == "within the seed-to-seed difference (±5.0%)"
    assert verdict({"ratio_ci": [0.98, 1.03]}, 0.05) == "no significant difference"
    assert verdict({"ratio_ci": [0.90, 0.95]}, 0.01) == "better"


def test_decision_picks_the_cheapest_passing_precision():
    rows = {"fp32": fake_row({"trained": 3.0, "q4": 3.1}, 0.4), "bf16": fake_row({"trained": 3.0, "q4": 3.1}, 0.2),
            "fp16": fake_row({"trained": 3.3, "q4": 3.4}, 0.1)}
    noise = fake_row({"trained": 3.01, "q4": 3.11}, 0.41)
    comparisons = compare(rows, noise, ["trained", "q4"], 300, 0.95)
    assert comparisons["vs_fp32"]["fp16"]["trained"]["verdict"] == "worse"
    decision = decide(rows, comparisons, REPORT, SEED)
    assert decision == {"status": "recommended", "precision": "bf16", "passing": ["fp32", "bf16"], "reasons": []}
    without_floor = decide(rows, compare(rows, None, ["trained", "q4"], 300, 0.95), REPORT, SEED)
    assert without_floor["status"] == "provisional" and "seed=1 evaluate.reference_seed=0" in without_floor["reasons"][0]


def test_a_fine_tune_that_worsened_the_model_and_formats_better_than_their_source_are_flagged():
    rows = {"fp32": fake_row({"trained": 3.0, "q4": 3.0}, 0.4), "bf16": fake_row({"trained": 3.0, "q4": 2.8}, 0.2)}
    fp32 = {"precision": "fp32", "start_heldout_loss": 2.97, "heldout_loss": 3.17}
    bf16 = {"precision": "bf16", "start_heldout_loss": 2.97, "heldout_loss": 2.5}
    rows["fp32"]["train"]["check"], rows["bf16"]["train"]["check"] = got_worse(fp32), got_worse(bf16)
    checks = training_checks(rows, compare(rows, None, ["trained", "q4"], 300, 0.95))
    assert len(checks) == 2
    assert checks[0].startswith("the fp32 fine-tune left the held-out loss worse than before training (2.97 -> 3.17)")
    assert checks[1].startswith("the perplexity of bf16 q4 is lower than its trained model's")
    rows["fp32"]["train"]["check"] = got_worse(fp32 | {"heldout_loss": 2.9})
    rows["bf16"]["sequence_nll"]["q4"] = rows["bf16"]["sequence_nll"]["trained"]
    assert training_checks(rows, compare(rows, None, ["trained", "q4"], 300, 0.95)) == []


def test_the_starting_weights_grid_effect_is_stated_only_as_its_intervals_support():
    def grid(start_ci, trained_ci):
        return {"type": "q4_k_m", "starting": {"kl": sum(start_ci) / 2, "kl_ci": start_ci},
                "trained": {"kl": sum(trained_ci) / 2, "kl_ci": trained_ci}}

    rows = {"fp32": fake_row({"trained": 3.0}, 0.4)}
    assert grid_lines(rows, "95%") == []  # not measured: no line, never a number
    rows["fp32"]["grid_effect"] = grid([0.01, 0.02], [0.05, 0.07])
    (line,) = grid_lines(rows, "95%")
    assert line.startswith("- **The starting weights' grid**: q4_k_m made from the starting weights costs KL 0.015 "
                           "[0.010, 0.020] against the starting model; made from the fine-tuned weights, KL 0.060 "
                           "[0.050, 0.070] against the fine-tuned model (95% intervals), 4.0× the starting model's")
    rows["fp32"]["grid_effect"] = grid([0.08, 0.1], [0.05, 0.07])
    assert "the starting model's is 1.5× it: the grid the file shipped the weights on gives q4_k_m no discount" in \
        grid_lines(rows, "95%")[0]
    rows["fp32"]["grid_effect"] = grid([0.01, 0.06], [0.05, 0.07])
    assert "within each other's intervals" in grid_lines(rows, "95%")[0]


def test_a_budget_with_one_served_format_ranks_nothing():
    cell = {"output_tokens_per_s": 30.0, "output_tokens_per_s_ci": [28.0, 32.0], "size_mb": 138.1}
    line = budget_line({"format": "trained.q8_0", "cell": cell, "same_speed": [], "within": 1}, 0.01)
    assert line == "  - KL ≤ 0.010: trained.q8_0, 30.000 [28.000, 32.000] tokens/s, the only served format within budget"
    assert "significantly faster" in budget_line({"format": "a", "cell": cell, "same_speed": [], "within": 2}, 0.01)


def test_fp32_alone_with_its_noise_floor_is_a_provisional_answer_that_names_the_others():
    rows, noise = {"fp32": fake_row({"trained": 3.0}, 0.4)}, fake_row({"trained": 3.01}, 0.41)
    decision = decide(rows, compare(rows, noise, ["trained"], 300, 0.95), REPORT, SEED)
    assert decision["status"] == "provisional" and decision["precision"] == "fp32" and decision["alone"]
    assert decision["reasons"][0].startswith("it is the only training precision run with these settings: bf16, fp16 "
                                             "were not (train.precision=compare trains those this machine runs natively)")
    # Without the noise floor it is a single run, not a comparison: no answer, and what adds one.
    assert decide(rows, compare(rows, None, ["trained"], 300, 0.95), REPORT, SEED)["status"] == "none"


def test_decision_refuses_with_the_numbers_when_the_data_cannot_support_one():
    few = {p: fake_row({"trained": 3.0}, t, sequences=5) for p, t in (("fp32", 0.4), ("bf16", 0.2))}
    decision = decide(few, compare(few, None, ["trained"], 300, 0.95), REPORT, SEED)
    assert decision["status"] == "none" and "only 5 held-out sequences" in decision["reasons"][0]
    noisy = {p: fake_row({"trained": 3.0}, t, spread=3.0) for p, t in (("fp32", 0.4), ("bf16", 0.2))}
    decision = decide(noisy, compare(noisy, None, ["trained"], 300, 0.95), REPORT, SEED)
    assert decision["status"] == "none" and "wider than report.max_interval_width=0.1 for bf16 at trained" in decision["reasons"][0]
    alone = {"bf16": fake_row({"trained": 3.0}, 0.2)}
    decision = decide(alone, compare(alone, None, ["trained"], 300, 0.95), REPORT, SEED)
    assert decision["status"] == "none" and "-m train.precision=fp32,bf16,fp16 stage=all" in decision["reasons"][0]


def test_the_deployable_is_the_recommended_precision_s_fastest_format_within_the_budget():
    rows = {"fp32": fake_row({"trained": 3.0, "q8": 3.0, "q4": 3.1}, 0.4), "bf16": fake_row({"trained": 3.0, "q8": 3.0, "q4": 3.1}, 0.2)}
    for name, kl, speed, size in (("q8", 1e-4, 500.0, 2.0), ("q4", 5e-3, 900.0, 1.0)):  # no speed rounds: ≈ in speed
        rows["bf16"]["artifacts"][name].update(kl=kl, output_tokens_per_s=speed, size_mb=size)
    decision = {"status": "provisional", "precision": "bf16", "passing": ["fp32", "bf16"], "reasons": []}
    assert deployable(rows, decision, 0.01, 100, 0.95) == {
        "precision": "bf16", "format": "q4", "decision": "provisional", "kl_budget": 0.01,
        "why": "the smallest file of the served formats ≈ in speed"}
    for name, rates in (("q8", (500, 505, 498)), ("q4", (900, 910, 905))):  # three serving rounds each
        rows["bf16"]["artifacts"][name]["speed_rounds"] = [{"rate": r, "latency_s": [0.1, 0.1]} for r in rates]
    assert deployable(rows, decision, 0.01, 100, 0.95)["why"] == "the served format significantly faster than the others"
    only = deployable(rows, decision, 1e-3, 100, 0.95)  # q4 is smaller and faster, but beyond the budget
    assert (only["format"], only["why"]) == ("q8", "the only served format")
    beyond = deployable(rows, decision, 1e-5, 100, 0.95)
    assert beyond == {"reason": "no served format of the bf16-trained model has a KL within report.deploy_kl=1e-05"}
    # No recommendation: nothing to register, and the report says so where it registers.
    nothing = deployable(rows, {"status": "none", "reasons": ["only 5 held-out sequences"]}, 0.01, 100, 0.95)
    assert deploy_lines(nothing, "tiny-pydoc") == ["- **Nothing registered** in MLflow's Model Registry: no training "
                                                   "precision is recommended (see above)."]
    assert deploy_lines(nothing, None) == []
    (line,) = deploy_lines(deployable(rows, decision, 0.01, 100, 0.95), "tiny-pydoc")
    assert line.startswith("- **To deploy**: the bf16-trained model as q4, the served format significantly faster than the "
                           "others with a KL within report.deploy_kl=0.010") and "registered in MLflow's Model Registry as tiny-pydoc" in line


def test_registering_needs_an_mlflow_store_and_is_on_for_a_server(tmp_path):
    assert "report.register=true registers in MLflow's Model Registry, and tracking=journal" in refused(
        tmp_path, "tracking=journal", "report.register=true")
    assert "report.registered_model=\"it's\" must be a name for MLflow's Model Registry" in refused(
        tmp_path, "report.register=true", "report.registered_model=\"it's\"")
    assert registering(compose_with("tracking=server")) and not registering(compose_with())
    assert registering(compose_with("report.register=true")) and not registering(compose_with("tracking=server", "report.register=false"))


def test_plot_data_holds_only_measured_values():
    rows = {"bf16": fake_row({"trained": 3.0, "q4": 3.1}, 0.2)}
    rows["bf16"]["artifacts"]["q4"]["output_tokens_per_s"] = 900.0
    data = {"rows": rows, "noise": None, "serve_level": "c1", "waterfall": {},
            "comparisons": compare(rows, None, ["trained", "q4"], 100, 0.95)}
    plots = plot_data(data, ["trained", "q4"], "kl", lambda a, b: False)
    assert set(plots) == {"loss_curves", "quality_vs_throughput", "perplexity_by_format"}
    assert [(q["format"], q["x"]) for q in plots["quality_vs_throughput"]["points"]] == [("q4", 900.0)]
    rows["bf16"]["train"]["history"] = {}
    del rows["bf16"]["artifacts"]["q4"]["output_tokens_per_s"]
    assert set(plot_data(data, ["trained", "q4"], "kl", lambda a, b: False)) == {"perplexity_by_format"}  # nothing drawn empty


def test_pareto_front_moves_only_on_significant_speed_differences():
    points = [{"x": x, "y": y} for x, y in [(10, 0.5), (20, 0.6), (5, 0.1), (8, 0.7), (20, 0.9)]]
    front = pareto_front(points, lambda a, b: a["x"] > b["x"])  # every speed difference significant
    assert [(p["x"], p["y"]) for p in front] == [(5, 0.1), (10, 0.5), (20, 0.6)]
    # No speed difference significant: the lowest quality loss beats every other point.
    assert [(p["x"], p["y"]) for p in pareto_front(points, lambda a, b: False)] == [(5, 0.1)]


def test_gates_pass_fail_and_skip_what_was_not_run():
    rows = {"fp32": {"artifacts": {"trained.q8_0": {"kl": 1e-5}, "trained.16bit": {"kl": 1e-8}}},
            "bf16": {"artifacts": {"trained.q8_0": {"kl": 3e-3}}}}
    gates = [{"artifact": "trained.q8_0", "metric": "kl", "max": 1e-3},
             {"artifact": "trained.bf16", "metric": "kl", "max": 1e-6, "precision": "bf16"},  # 16-bit: one column
             {"artifact": "trained.q8_0", "metric": "kl", "min": 0.0}]
    results = gate_results(rows, ["fp32", "bf16", "fp16"], gates)
    assert [(g["precision"], g["status"]) for g in results] == [
        ("fp32", "pass"), ("bf16", "FAIL"), ("fp16", "skipped"),
        ("bf16", "FAIL"),  # the bf16 row has no 16-bit value: missing in a run precision fails
        ("fp32", "pass"), ("bf16", "pass"), ("fp16", "skipped")]
    assert gate_line(results[1]) == "- FAIL: bf16 trained.q8_0 kl = 3.00e-03 (limit <= 0.001)"
    assert gate_line(results[3]).endswith("kl = missing (limit <= 1e-06)")


@pytest.mark.slow
def test_the_ci_gates_pass_on_the_two_precision_smoke_sweep(reports, tmp_path):
    """The quality gates this project's CI enforces (conf/report/ci.yaml), on the real fp32 + bf16
    sweep above: a broken export, quantizer or server fails CI here."""
    shutil.copytree(reports.cwd / "artifacts", tmp_path / "artifacts", symlinks=True)
    pipeline(tmp_path, "stage=report", "report=ci", *CHAIN)
    gates = read_json(stage_dir(compose_with("report=ci", *CHAIN, f"paths.artifacts={tmp_path}/artifacts"), "report")
                      / "gates.json")
    assert len(gates) == 2 * len(compose_with("report=ci").report.gates)
    assert all(g["status"] == "pass" for g in gates), [g for g in gates if g["status"] != "pass"]
