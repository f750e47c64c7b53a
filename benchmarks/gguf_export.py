"""The export stage against llama.cpp's converter run alone, per model family: the cost of what the
stage adds (loading the file back in llama.cpp, the tokenizer checks, the logit check against the
source model, MLflow) on top of the conversion itself.

For each family a tiny checkpoint (tests/families.py) is fine-tuned for two steps, then timed, each
in fresh processes (best of REPEATS):
  - `python -m pipeline stage=export` writing and validating the 16-bit base file only;
  - llama.cpp's converter alone on the same checkpoint (`python -m pipeline.llamacpp convert`: its
    own main(), naming a pre-tokenizer it does not recognise, as the stage does).

    python benchmarks/gguf_export.py [FAMILY ...]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.families import FAMILIES, checkpoint  # noqa: E402

REPEATS = 2
SETTINGS = ["model=hf", "profile=smoke", "train.precision=fp32", "train.max_steps=2", "train.eval_every=2",
            "train.checkpoint_every=2", "data.seq_len=64", "export.sources=[trained]", "export.types=[]"]


def timed(args: list[str], cwd: Path, repeats: int = REPEATS) -> float:
    """Best wall time of `repeats` fresh processes (the least disturbed by the machine)."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        result = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        if result.returncode:
            sys.exit(result.stderr[-3000:])
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    families = sys.argv[1:] or list(FAMILIES)
    rows = []
    for family in families:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            settings = [*SETTINGS, f"model.name_or_path={checkpoint(family, tmp / family)}"]
            timed(["-m", "pipeline", "stage=[prepare,train]", *settings], tmp, repeats=1)
            (trained,) = (tmp / "artifacts" / "train").iterdir()
            stage = timed(["-m", "pipeline", "stage=export", "rerun=[export]", *settings], tmp)
            alone = timed(["-m", "pipeline.llamacpp", "convert", str(trained), str(tmp / "alone.gguf"), "f16", family,
                           "auto", "{}"], tmp)
        rows.append((family, stage, alone))
        print(f"{family}: stage {stage:.2f} s, converter alone {alone:.2f} s", file=sys.stderr)

    print("\n| family | export stage s | llama.cpp's converter alone s | ratio |\n|---|---|---|---|")
    for family, stage, alone in rows:
        print(f"| {family} | {stage:.2f} | {alone:.2f} | {stage / alone:.2f} |")


if __name__ == "__main__":
    main()
