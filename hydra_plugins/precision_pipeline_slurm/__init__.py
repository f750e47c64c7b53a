"""Hydra's SLURM launcher (hydra-submitit-launcher) with a failed job reported in one line.

Hydra finds launchers only in the `hydra_plugins` namespace package, hence this package's place.
The stock launcher lets submitit's UncompletedJobError through, which Hydra prints as a traceback
ending with the job's stderr; this one prints the job's own `error:` line (or its last words),
with the job's id, its state and the path of its log, and exits with status 1.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

try:
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
except ImportError:  # the slurm extra is not installed: no launcher to extend
    SlurmLauncher = None


def one_line(message: str) -> str:
    """submitit's report of a job that produced no result, as one `error:` line."""
    from pipeline.contract import last_words

    job = re.search(r"Job (\S+) \(task: (\d+)\)", message)
    state = re.search(r"\(state: ([A-Z_]+)", message)
    stream = message.split("-" * 40, 1)[-1]
    ours = re.findall(r"^error: (.*)$", stream, re.MULTILINE)
    reason = ours[-1] if ours else last_words(stream)
    result = re.search(r"with path (\S+)_result\.pkl", message)
    log = f"{result[1]}_log.err" if result else next(iter(re.findall(r"(\S+_log\.err)", message)), None)
    where = f"SLURM job {job[1]}" if job else "a SLURM job"
    return (f"error: {where} failed{f' ({state[1]})' if state else ''}: {reason}"
            + (f" (its log: {Path(log)})" if log else ""))


if SlurmLauncher is not None:
    class OneLineSlurmLauncher(SlurmLauncher):
        def launch(self, job_overrides, initial_job_idx):
            from submitit.core.utils import UncompletedJobError

            try:
                return super().launch(job_overrides, initial_job_idx)
            except UncompletedJobError as error:
                # Said and ended here: Hydra prints any exception with a hint about HYDRA_FULL_ERROR
                # after it, and a SystemExit is no Exception it catches.
                print(one_line(str(error)), file=sys.stderr, flush=True)
                raise SystemExit(1) from None
