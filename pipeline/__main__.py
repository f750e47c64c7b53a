"""`python -m pipeline stage=<name>`: the one entry point.

Only Hydra is imported at module level so that `--help` stays fast; torch, transformers and
mlflow load inside the stages.
"""

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from pipeline.config import register

CONF = Path(__file__).resolve().parent.parent / "conf"
register()  # the typed schemas the config groups build on, before Hydra composes them


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="config")
def main(cfg: DictConfig) -> None:
    from pipeline.contract import USER_ERRORS
    from pipeline.runner import run

    try:
        run(cfg)
    except USER_ERRORS as error:
        # A bad setting, a path, a refused precision, a failed gate: the message says what to
        # change, and a traceback would only bury it.
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        # One line, always: where a message brings more (a tool's output), the rest is kept in a file.
        first, *rest = str(error).strip().splitlines() or [type(error).__name__]
        if rest:
            from pipeline.artifacts import keep_log

            first += f" (the rest of this message: {keep_log('error', str(error))})"
        print(f"error: {first}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
