"""What QAT costs a training step: the train stage as users run it, plain and with every train.qat
format at the same precision (the smoke profile's fine-tune of the tiny model, unless overrides are
given), alternating in rounds so that the machine's load moves every side. Each round's ratio is
a QAT arm's mean step time over the plain run's of the same round; the figure is the median of the
rounds.

    python benchmarks/qat_overhead.py [override ...]
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.formats import NO_QAT, QAT  # noqa: E402

ROUNDS = 3
ARMS = (NO_QAT, *QAT)


def trained_for(folder: str) -> str:
    """The train.qat of a train output, from its name (<model>-<precision>[-qat_<format>]-seed<n>-<hash>)."""
    return folder.split("-qat_")[1].split("-")[0] if "-qat_" in folder else NO_QAT


def main(overrides: list[str]) -> None:
    settings = ["profile=smoke", "model=tiny", "train.precision=fp32", *overrides]
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pipeline", "stage=prepare", *settings], cwd=tmp, check=True,
                       capture_output=True)
        seconds = {arm: [] for arm in ARMS}
        for _ in range(ROUNDS):
            for arm in ARMS:
                subprocess.run([sys.executable, "-m", "pipeline", "stage=train", f"train.qat={arm}", "rerun=[train]",
                                *settings], cwd=tmp, check=True, capture_output=True)
                (out,) = (p for p in (Path(tmp) / "artifacts" / "train").iterdir()
                          if trained_for(p.name) == arm and not p.name.startswith("."))
                seconds[arm].append(json.loads((out / "summary.json").read_text())["step_time_s"])
    print(f"| train.qat | step time (s, median of {ROUNDS}) | against plain (median of the rounds' ratios) |\n|---|---|---|")
    print(f"| {NO_QAT} | {statistics.median(seconds[NO_QAT]):.3f} | x1.00 |")
    for arm in QAT:
        ratios = [q / p for p, q in zip(seconds[NO_QAT], seconds[arm])]
        print(f"| {arm} | {statistics.median(seconds[arm]):.3f} | x{statistics.median(ratios):.2f} "
              f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)}) |")


if __name__ == "__main__":
    main(sys.argv[1:])
