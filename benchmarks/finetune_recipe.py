"""Fine-tune recipes for a real pretrained model: what each costs a step and what it gains on the
held-out answers.

Each recipe runs the prepare and train stages of the pipeline on the same model, data and seed,
in one process and one after another, and the table gives its median step time (also as a ratio to
the first recipe's, measured in the same command), its whole training time, and the held-out
answer loss before and after. The default model is SmolLM2-135M-Instruct on the chat data.

    python benchmarks/finetune_recipe.py [--steps 30] [--recipes full-5e-5 lora-2e-4] [-- override ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.artifacts import read_json, stage_dir  # noqa: E402
from pipeline.config import register  # noqa: E402
from pipeline.runner import run  # noqa: E402

register()
WARMUP = 3  # steps left out of the step time (allocator and kernel warm-up)
RECIPES = {
    "full-5e-5": ["train.lr=5e-5", "model.lora.enabled=false"],
    "full-1e-4": ["train.lr=1e-4", "model.lora.enabled=false"],
    "lora-2e-4": ["train.lr=2e-4", "model.lora.enabled=true", "model.lora.r=16", "model.lora.alpha=32",
                  "model.lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"],
    "full-5e-5-mb4": ["train.lr=5e-5", "model.lora.enabled=false", "train.micro_batch_size=4"],
    "full-1e-4-mb4": ["train.lr=1e-4", "model.lora.enabled=false", "train.micro_batch_size=4"],
    "full-2e-4-mb4": ["train.lr=2e-4", "model.lora.enabled=false", "train.micro_batch_size=4"],
}
BASE = ["model=smollm2", "data=stdlib", "train.precision=fp32", "train.warmup_ratio=0.1", "train.log_every=1",
        "train.eval_batches=8", "tracking.log_model=false"]


def config(workdir: Path, stage: str, steps: int, overrides: list[str]):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[
            f"stage={stage}", *BASE, f"train.max_steps={steps}", f"train.eval_every={steps}",
            f"train.checkpoint_every={steps}", f"tracking.uri=sqlite:///{workdir}/mlflow.db",
            f"tracking.artifact_location={workdir}/mlruns", f"paths.artifacts={workdir}/artifacts", *overrides])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=sorted(RECIPES))
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides, for every recipe (after --)")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.recipes:
            overrides = [*RECIPES[name], *args.overrides]
            run(config(Path(tmp), "[prepare,train]", args.steps, overrides))
            summary = read_json(stage_dir(config(Path(tmp), "train", args.steps, overrides), "train") / "summary.json")
            step = statistics.median(v for s, v in summary["history"]["step_time_s"] if s > WARMUP)
            rows.append((name, step, summary["train_seconds"], summary["start_heldout_loss"], summary["heldout_loss"],
                         summary["tokens"] / max(1, args.steps)))

    first = rows[0][1]
    print(f"\n{'recipe':<16}{'s/step':>8}{'ratio':>7}{'train s':>9}{'real tokens/step':>17}{'held-out loss':>22}")
    for name, step, seconds, start, end, tokens in rows:
        print(f"{name:<16}{step:>8.2f}{step / first:>7.2f}{seconds:>9.0f}{tokens:>17.0f}{start:>11.3f} -> {end:.3f}")


if __name__ == "__main__":
    main()
