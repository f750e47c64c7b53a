"""`python -m pipeline` inside a process forked from the test server (tests/conftest.py:
`pipeline`), run by runpy.run_path with ARGV, CWD, ENV, STDOUT and STDERR given as globals."""

import atexit
import multiprocessing
import os
import runpy
import sys

os.chdir(CWD)  # noqa: F821 (given by runpy.run_path)
os.environ.clear()
os.environ.update(ENV)  # noqa: F821
# As `python -m` with PYTHONPATH sets it: the working directory, then the code under test.
sys.path[:0] = [CWD, *ENV["PYTHONPATH"].split(os.pathsep)]  # noqa: F821
opened = {}  # one file for both where they are the same: two openings would overwrite each other
for fd, path in ((1, STDOUT), (2, STDERR)):  # noqa: F821
    if path not in opened:
        opened[path] = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(opened[path], fd)
for descriptor in opened.values():
    os.close(descriptor)
sys.argv = ["pipeline", *ARGV]  # noqa: F821
# A forkserver's child would start its processes through the forkserver too, where a new interpreter
# uses the platform's default (fork on Linux). GuideLLM's data loader starts its worker with the
# default: through the forkserver, that worker imported GuideLLM's data modules anew (5 s a level).
multiprocessing.set_start_method(None, force=True)
try:
    runpy.run_module("pipeline", run_name="__main__", alter_sys=True)
finally:
    # A forked child ends in os._exit, which runs no exit handlers; the interpreter would.
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
