"""`python -m pipeline stage=<name>`: the one entry point.

Only Hydra is imported at module level so that `--help` stays fast; torch, transformers and
mlflow load inside the stages.
"""

from pathlib import Path

import hydra
from omegaconf import DictConfig

CONF = Path(__file__).resolve().parent.parent / "conf"


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="config")
def main(cfg: DictConfig) -> None:
    from pipeline.runner import run

    run(cfg)


if __name__ == "__main__":
    main()
