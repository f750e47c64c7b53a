"""What the export's dry run before training costs a user's checkpoint: llama.cpp's converter with
--vocab-only on its config and tokenizer, the vocabulary loaded in llama.cpp and the probe's ids
compared with transformers' (stages/export.py, dry_run), on tiny checkpoints of the families whose
vocabulary transformers 5 saves as tokenizer.json alone (tests/families.py, tokenizer.model
removed). Each family: the median of three runs with an empty cache, then one cached run.

    python benchmarks/dry_run.py
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from hydra import compose, initialize_config_dir  # noqa: E402

from families import FAMILIES, checkpoint  # noqa: E402
from pipeline.artifacts import machine_cache  # noqa: E402
from pipeline.config import register  # noqa: E402
from stages.export import dry_run  # noqa: E402

CASES = ("llama2", "gemma2", "phi3")


def timed(cfg, arch: str) -> float:
    started = time.perf_counter()
    dry_run(cfg, arch)
    return time.perf_counter() - started


def main() -> None:
    register()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["XDG_CACHE_HOME"] = str(Path(tmp) / "cache")  # cold: nothing cached from earlier runs
        print("| family | dry run, cold (median of 3) | cached |\n|---|---|---|")
        for family in CASES:
            model = checkpoint(family, Path(tmp) / family)
            (model / "tokenizer.model").unlink()
            with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
                cfg = compose("config", overrides=["model=hf", f"model.name_or_path={model}", "data.seq_len=64"])
            arch, cold = FAMILIES[family][0]["architectures"][0], []
            for _ in range(3):
                shutil.rmtree(machine_cache() / "dry-run", ignore_errors=True)
                cold.append(timed(cfg, arch))
            print(f"| {family} | {statistics.median(cold):.1f} s | {timed(cfg, arch):.3f} s |")


if __name__ == "__main__":
    main()
