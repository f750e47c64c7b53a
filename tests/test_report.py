"""report: a real two-precision sweep, its tables, plots, HTML and quality gates."""

import base64
from html.parser import HTMLParser

import pytest

from pipeline.artifacts import read_json
from stages.report import pareto_front
from tests.conftest import SMALL_CHAIN, only_dir, pipeline, replace, runs

SWEEP = replace(SMALL_CHAIN, "serve.llamacpp.files=[trained.q4_k_m]", "serve.load.levels=[1]", "report.precisions=[fp32,bf16]")
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("sweep")
    pipeline(cwd, "stage=all", *replace(SWEEP, "train.precision=fp32,bf16"), multirun=True)
    return cwd


class Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.tables = [], 0

    def handle_starttag(self, tag, attrs):
        self.tables += tag == "table"
        if tag == "img":
            self.images.append(dict(attrs)["src"])


def test_report_fills_every_cell_and_embeds_its_plots(sweep):
    report = only_dir(sweep / "artifacts" / "report")
    data = read_json(report / "report.json")
    assert set(data["rows"]) == {"fp32", "bf16"} and all(data["rows"].values())
    columns = data["columns"]
    assert {"trained", "awq", "rtn", "trained.16bit", "trained.q8_0", "trained.q4_k_m", "awq_smoothed.q4_k_m"} <= set(columns)
    for precision, row in data["rows"].items():
        for name in columns:
            cell = row["artifacts"][name]
            for key in ("perplexity", "perplexity_ci", "kl", "kl_ci", "kl_vs_fp32", "top1", "size_mb",
                        "perplexity_ratio_to_fp32"):
                assert cell.get(key) is not None, (precision, name, key)
        assert row["artifacts"]["trained.q4_k_m"]["output_tokens_per_s"] > 0
        assert row["train"]["step_time_s"] > 0 and row["train"]["history"]["train_loss"]
    # bf16 is measured against its own trained model and against the fp32-trained one
    bf16 = data["rows"]["bf16"]["artifacts"]["trained"]
    assert bf16["kl"] == pytest.approx(0, abs=1e-7) and bf16["kl_vs_fp32"] > 1e-4

    markdown = (report / "report.md").read_text()
    assert "| bf16 |" in markdown and "n/a" not in markdown.split("## Serving")[0]
    assert "Noise floor unknown" in markdown
    parser = Images()
    parser.feed((report / "report.html").read_text())
    assert parser.tables >= 5 and len(parser.images) == 3
    for src in parser.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG)
    for name in ("loss_curves", "quality_vs_throughput", "kl_by_format"):
        assert (report / f"{name}.png").read_bytes().startswith(PNG)
    reports = runs(sweep, "report")
    assert len(reports) == 2  # each job of the sweep refreshed the one report


def test_tight_gate_fails_with_the_list_and_loose_gate_passes(sweep):
    data = read_json(only_dir(sweep / "artifacts" / "report") / "report.json")
    measured = data["rows"]["bf16"]["artifacts"]["trained.q4_k_m"]["kl"]
    tight = f"report.gates=[{{artifact: trained.q4_k_m, metric: kl, max: {measured / 2}, precision: bf16}}]"
    result = pipeline(sweep, "stage=report", *replace(SWEEP, tight), check=False)
    assert result.returncode != 0
    assert "1 quality gate(s) failed" in result.stderr
    assert f"FAIL: bf16 trained.q4_k_m kl = {measured:.2e}" in result.stderr
    loose = f"report.gates=[{{artifact: trained.q4_k_m, metric: kl, max: {measured * 2}}}, {{artifact: trained, metric: perplexity_ratio_to_fp32, max: 2}}]"
    pipeline(sweep, "stage=report", *replace(SWEEP, loose))
    gates = read_json(only_dir(sweep / "artifacts" / "report") / "gates.json")
    assert [g["status"] for g in gates] == ["pass"] * 4


def test_noise_floor_is_stated_when_a_second_seed_exists(sweep):
    pipeline(sweep, "stage=[train,quantize,export,evaluate]", *replace(SWEEP, "seed=1"))
    pipeline(sweep, "stage=report", *SWEEP)
    markdown = (only_dir(sweep / "artifacts" / "report") / "report.md").read_text()
    assert "Noise floor: two fp32 runs with seeds 0 and 1 differ in perplexity by" in markdown


def test_report_from_mlflow_run_ids_matches_the_artifacts(sweep):
    by_artifacts = read_json(only_dir(sweep / "artifacts" / "report") / "report.json")
    ids = [runs(sweep, f"tiny-{p}")[0].info.run_id for p in ("fp32", "bf16")]
    pipeline(sweep, "stage=report", *replace(SWEEP, f"report.runs=[{','.join(ids)}]"))
    reports = sorted((sweep / "artifacts" / "report").iterdir(), key=lambda p: (p / "report.json").stat().st_mtime)
    by_runs = read_json(reports[-1] / "report.json")
    assert "MLflow runs:" in by_runs["notes"][0]
    for precision in ("fp32", "bf16"):
        for name in ("trained", "awq", "trained.q4_k_m", "awq_smoothed.16bit"):
            ours, theirs = by_runs["rows"][precision]["artifacts"][name], by_artifacts["rows"][precision]["artifacts"][name]
            for key in ("perplexity", "kl", "kl_vs_fp32", "top1"):
                assert ours[key] == pytest.approx(theirs[key], rel=1e-6), (precision, name, key)
            assert ours["perplexity_ci"] == pytest.approx(theirs["perplexity_ci"], rel=1e-6)
        assert by_runs["rows"][precision]["artifacts"]["trained.q4_k_m"]["ttft_ms_p50"] == pytest.approx(
            by_artifacts["rows"][precision]["artifacts"]["trained.q4_k_m"]["ttft_ms_p50"])


def test_bad_gate_is_refused_before_work(tmp_path):
    result = pipeline(tmp_path, "report.gates=[{artifact: trained, metric: speed, max: 1}]", check=False)
    assert result.returncode != 0 and "metric (one of perplexity, kl" in result.stderr


def test_pareto_front():
    points = [(10, 0.5), (20, 0.6), (5, 0.1), (8, 0.7), (20, 0.9)]
    assert pareto_front(points) == [(5, 0.1), (10, 0.5), (20, 0.6)]
