"""What each calibrated or 8-bit quantizer costs against plain RTN: the quantize stage as users run
it, on one fine-tune (the smoke profile's, the tiny model's shapes, unless overrides are given),
every method in one stage run, and the export's importance matrix for q4_k_m (llama-imatrix over
the same calibration samples, then llama-quantize with it) right after; three rounds. Each time is
the median of the three, and its ratio to RTN's is taken within each round, so the machine's load
moves both sides.

    python benchmarks/quantize_methods.py [override ...]
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

from pipeline.formats import METHODS  # noqa: E402

RUNS = 3


def main(overrides: list[str]) -> None:
    methods = ["rtn", *(m for m in METHODS if m != "rtn")]
    settings = ["profile=smoke", "model=tiny", "train.precision=fp32", f"quantize.methods=[{','.join(methods)}]",
                "export.sources=[trained]", "export.types=[q4_k_m]", "export.imatrix=[q4_k_m]", *overrides]
    imatrix = "imatrix (q4_k_m)"
    with tempfile.TemporaryDirectory() as tmp:
        seconds = {m: [] for m in [*methods, imatrix]}
        for run in range(RUNS):
            stages = "stage=[prepare,train,quantize,export]" if run == 0 else "stage=[quantize,export]"
            subprocess.run([sys.executable, "-m", "pipeline", stages, *settings,
                            *(["rerun=[quantize,export]"] if run else [])], cwd=tmp, check=True, capture_output=True)
            (out,) = (Path(tmp) / "artifacts" / "quantize").iterdir()
            for method, info in json.loads((out / "summary.json").read_text())["methods"].items():
                seconds[method].append(info["seconds"])
            (out,) = (Path(tmp) / "artifacts" / "export").iterdir()
            made = json.loads((out / "manifest.json").read_text())["trained"]["q4_k_m-imat"]
            seconds[imatrix].append(made["imatrix"]["seconds"] + made["seconds"])
        methods.append(imatrix)
    print(f"| method | seconds (median of {RUNS}) | against RTN (median of the runs' ratios) |\n|---|---|---|")
    for method in methods:
        ratios = [s / r for s, r in zip(seconds[method], seconds["rtn"])]
        print(f"| {method} | {statistics.median(seconds[method]):.2f} | x{statistics.median(ratios):.1f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
