"""One of the processes `accelerate launch` starts for a stage (pipeline.distributed launches them).

Run as `python -m pipeline.worker CONFIG STAGE RUN_ID ERRORS`: it runs the stage with the
pipeline process's resolved config; rank 0 logs into the pipeline's open MLflow run for the
stage. A process that fails writes its traceback to ERRORS/rank-<rank>.txt for the launcher.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback
from pathlib import Path

from omegaconf import OmegaConf

from pipeline.graph import STAGES
from pipeline.tracking import NoTracker, open_tracker, quiet_libraries


def main(config: str, stage: str, run_id: str, errors: str) -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[%(asctime)s][rank {rank}][%(name)s][%(levelname)s] - %(message)s")
    quiet_libraries()
    try:
        cfg = OmegaConf.load(config)
        tracker = open_tracker(cfg, attach=run_id) if rank == 0 and run_id else NoTracker()
        try:
            STAGES[stage].run(cfg, tracker)
        except BaseException:
            with contextlib.suppress(Exception):  # the stage's error is the one to report
                tracker.flush()
            raise
        tracker.flush()
    except BaseException:
        path = Path(errors) / f"rank-{rank}.txt"
        path.with_suffix(".partial").write_text(traceback.format_exc())
        path.with_suffix(".partial").rename(path)
        raise


if __name__ == "__main__":
    main(*sys.argv[1:])
