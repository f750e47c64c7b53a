"""What a person sees: a line as each stage starts and ends, the pipeline's own bar, the report's
place at the end, and none of the libraries' bars or warnings, which land in each stage's log."""

import os
import pty
import re
import threading

import pytest

from tests.conftest import FAST, pipeline, runs

STAGES = ("prepare", "train", "quantize", "export", "evaluate", "serve", "report")
# What the libraries write while the stages run: llm-compressor's calibration bars and its
# accelerator warning, torchao's import warnings, torch's C++ warnings, transformers' warnings.
NOISE = re.compile(r"Grid search|Calibrating|No accelerator|torchao|W\d{4} \d\d:|UserWarning|FutureWarning|it/s\]")


def stage_lines(text: str) -> dict[str, list[str]]:
    return {name: [line for line in text.splitlines() if re.match(rf"\[\d/\d\] {name}\b", line)] for name in STAGES}


def test_a_plain_log_shows_each_stage_twice_and_where_the_report_is(chain):
    """The shared chain's output, captured as a plain log (not a terminal): no bars at all."""
    text = (chain / "console.txt").read_text()
    lines = text.strip().splitlines()
    for name, found in stage_lines(text).items():
        number = STAGES.index(name) + 1
        assert found[0] == f"[{number}/7] {name} ...", found
        assert re.fullmatch(rf"\[{number}/7\] {name} done in [\d.]+ s -> artifacts/{name}/\S+", found[1]), found
        assert len(found) == 2, found
    assert not NOISE.search(text), NOISE.search(text)
    assert "\r" not in text  # no bar redrawn in place
    # What the pipeline chose for the model, where it was asked to, under the precision it runs.
    precision = next(i for i, line in enumerate(lines) if line.startswith("precision: "))
    assert lines[precision + 1] == ("quantize.group_size=auto: 128, the largest of 128, 64, 32 that divides every "
                                    "quantized Linear layer's input width (256, 768)"), lines[:3]
    assert lines[-2].startswith("report: artifacts/report/") and "report.html" in lines[-2]
    assert lines[-1].startswith("runs in MLflow: mlflow ui --backend-store-uri sqlite:///mlflow.db")
    # Where the noise went instead: each stage's log beside its output, also in the stage's MLflow run.
    quantize_log = next((chain / "artifacts" / "logs" / "quantize").glob("*.log")).read_text()
    assert "No accelerator" in quantize_log
    quantize_run = runs(chain, "quantize")[-1]
    from tests.conftest import mlflow_client

    logged = [a.path for a in mlflow_client(chain).list_artifacts(quantize_run.info.run_id, "log")]
    assert logged and logged[0].endswith(".log")


@pytest.mark.slow
def test_a_terminal_shows_the_training_bar_and_no_other(tmp_path):
    """In a real terminal (a pseudo-terminal): the pipeline's own training bar, redrawn in place,
    and still none of the libraries'; verbose=true lets theirs through."""

    def on_terminal(*overrides: str) -> str:
        leader, follower = pty.openpty()
        chunks = []

        def drain():  # as a terminal does, or the run would block once the terminal's buffer is full
            while True:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # the terminal closes when the last process writing to it ends
                    return
                if not chunk:
                    return
                chunks.append(chunk)

        reader = threading.Thread(target=drain)
        reader.start()
        try:
            result = pipeline(tmp_path, "stage=[prepare,train,quantize]", *FAST, "train.precision=fp32",
                              "quantize.methods=[awq]", "rerun=all", *overrides, check=False,
                              terminal=os.ttyname(follower))
        finally:
            os.close(follower)
            reader.join()
            os.close(leader)
        text = b"".join(chunks).decode(errors="replace")
        assert result.returncode == 0, text[-3000:]
        return text

    text = on_terminal()
    assert re.search(r"train fp32: +\d+%\|", text), text[-2000:]
    assert not NOISE.search(text.replace("it/s]", "")), NOISE.search(text)  # the bar's own rate aside
    assert "[3/3] quantize done in" in text
    verbose = on_terminal("verbose=true")
    assert "No accelerator" in verbose  # llm-compressor's own warning, where it asked to be seen
