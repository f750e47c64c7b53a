"""What QAT costs a training step: the train stage as users run it, plain and with train.qat=q4_0
at the same precision (the smoke profile's fine-tune of the tiny model, unless overrides are
given), alternating in rounds so that the machine's load moves both sides. Each round's ratio is
QAT's mean step time over the plain run's just before it; the figure is the median of the rounds.

    python benchmarks/qat_overhead.py [override ...]
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROUNDS = 3
ARMS = ("none", "q4_0")


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
                          if ("-qat_" in p.name) == (arm != "none") and not p.name.startswith("."))
                seconds[arm].append(json.loads((out / "summary.json").read_text())["step_time_s"])
    ratios = [q / p for p, q in zip(seconds["none"], seconds["q4_0"])]
    print(f"| train.qat | step time (s, median of {ROUNDS}) | against plain (median of the rounds' ratios) |\n|---|---|---|")
    print(f"| none | {statistics.median(seconds['none']):.3f} | x1.00 |")
    print(f"| q4_0 | {statistics.median(seconds['q4_0']):.3f} | x{statistics.median(ratios):.2f} "
          f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)}) |")


if __name__ == "__main__":
    main(sys.argv[1:])
