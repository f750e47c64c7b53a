"""A team's infrastructure, for real, on loopback: a one-machine SLURM cluster with its accounting
database, and PostgreSQL as the backend store of an MLflow server. Debian's packages provide them
(`make services` installs what is missing); each daemon runs in the foreground as a child of the
test process, in a folder of its own, and is stopped when its `with` block ends."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.server import Server, free_port, log_tail

PG_BIN = Path("/usr/lib/postgresql/15/bin")
SLURM_COMMANDS = ("slurmctld", "slurmd", "slurmdbd", "sbatch", "sacct", "munged", "mariadbd", "mariadb-install-db")
POSTGRES_COMMANDS = (PG_BIN / "initdb", PG_BIN / "postgres")
# The socket every SLURM command and daemon asks munge through: slurm 22.05 ignores AuthInfo's
# socket for its accounting connections, so the cluster's munged listens at the default path.
MUNGE_SOCKET = Path("/run/munge/munge.socket.2")


def require(commands, what: str) -> None:
    """Skip where the service is not installed; CI (PP_REQUIRE_SERVICES=1) fails instead."""
    missing = [str(c) for c in commands if not (Path(c).is_file() if Path(c).is_absolute() else shutil.which(c))]
    if missing:
        message = f"{what} is not installed (missing {', '.join(missing)}): `make services` installs it"
        if os.environ.get("PP_REQUIRE_SERVICES") == "1":
            pytest.fail(message)
        pytest.skip(message)


@contextlib.contextmanager
def daemon(command: list[str], log: Path, ready, timeout_s: float = 60, **popen):
    """`command` in the foreground, until the block ends; `ready()` is polled until it is true."""
    with open(log, "ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **popen)
    try:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{command[0]} did not come up ({process.poll()=}):\n{log_tail(log)}")
            time.sleep(0.2)
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def call(*command: str, env: dict | None = None) -> None:
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-2000:]}{result.stderr[-2000:]}")


def succeeds(*command: str, env: dict | None = None) -> bool:
    return subprocess.run(command, capture_output=True, env=env).returncode == 0


@contextlib.contextmanager
def slurm_cluster(root: Path):
    """slurmctld and slurmd for this machine as one node of two CPUs, with accounting through
    slurmdbd into MariaDB, so that `sacct` answers. Yields the environment its commands need."""
    require(SLURM_COMMANDS, "SLURM")
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o700)
    ports = {name: free_port() for name in ("ctld", "slurmd", "dbd", "mysql")}
    password = secrets.token_hex(8)
    env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}
    with contextlib.ExitStack() as stack:
        if not succeeds("munge", "-n"):  # one munged per machine; start it where none answers
            key = root / "munge.key"
            key.write_bytes(secrets.token_bytes(1024))
            key.chmod(0o600)
            MUNGE_SOCKET.parent.mkdir(parents=True, exist_ok=True)
            stack.enter_context(daemon(
                ["munged", "--foreground", "--force", f"--key-file={key}", f"--log-file={root}/munged.log",
                 f"--pid-file={root}/munged.pid", f"--seed-file={root}/munged.seed"],
                root / "munged.out", lambda: succeeds("munge", "-n")))

        call("mariadb-install-db", "--no-defaults", f"--datadir={root}/db", "--user=root",
             "--auth-root-authentication-method=normal", "--skip-test-db")
        socket = root / "mysql.sock"
        sql = ["mariadb", "--no-defaults", f"--socket={socket}", "-uroot"]
        stack.enter_context(daemon(
            ["mariadbd", "--no-defaults", f"--datadir={root}/db", "--user=root", f"--socket={socket}",
             f"--port={ports['mysql']}", "--bind-address=127.0.0.1", "--skip-name-resolve", f"--log-error={root}/mysql.log",
             f"--pid-file={root}/mysql.pid"], root / "mysql.out", lambda: succeeds(*sql, "-e", "SELECT 1")))
        call(*sql, "-e", f"CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '{password}'; "
             "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';")

        (root / "state").mkdir()
        (root / "spool").mkdir()
        dbd = root / "slurmdbd.conf"  # beside slurm.conf, where slurmdbd looks for it
        dbd.write_text("\n".join([
            "AuthType=auth/munge", "DbdHost=localhost", "DbdAddr=127.0.0.1", f"DbdPort={ports['dbd']}", "SlurmUser=root",
            "StorageType=accounting_storage/mysql", "StorageHost=127.0.0.1", f"StoragePort={ports['mysql']}",
            "StorageUser=slurm", f"StoragePass={password}", "StorageLoc=slurm_acct_db",
            f"PidFile={root}/slurmdbd.pid", f"LogFile={root}/slurmdbd.log", ""]))
        dbd.chmod(0o600)  # slurmdbd refuses a config others can read: it holds the password
        (root / "slurm.conf").write_text("\n".join([
            "ClusterName=pipeline", "SlurmctldHost=localhost(127.0.0.1)", f"SlurmctldPort={ports['ctld']}",
            f"SlurmdPort={ports['slurmd']}", "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge",
            f"StateSaveLocation={root}/state", f"SlurmdSpoolDir={root}/spool", f"SlurmctldPidFile={root}/slurmctld.pid",
            f"SlurmdPidFile={root}/slurmd.pid", f"SlurmctldLogFile={root}/slurmctld.log", f"SlurmdLogFile={root}/slurmd.log",
            # No cgroups in a container: processes are tracked by their parents, tasks are not pinned.
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU", "ReturnToService=2",
            "AccountingStorageType=accounting_storage/slurmdbd", "AccountingStorageHost=127.0.0.1",
            f"AccountingStoragePort={ports['dbd']}", "JobAcctGatherType=jobacct_gather/none",
            f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory=4096 State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""]))
        stack.enter_context(daemon(["slurmdbd", "-D"], root / "slurmdbd.out",
                                   lambda: succeeds("sacctmgr", "-n", "list", "cluster", env=env), env=env))
        call("sacctmgr", "-i", "add", "cluster", "pipeline", env=env)
        stack.enter_context(daemon(["slurmctld", "-D", "-i"], root / "slurmctld.out",
                                   lambda: succeeds("scontrol", "ping", env=env), env=env))
        stack.enter_context(daemon(["slurmd", "-D", "-N", "localhost"], root / "slurmd.out",
                                   lambda: b"idle" in subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True,
                                                                     env=env).stdout, env=env))
        yield env


def sacct(env: dict, *job_ids: str, timeout_s: float = 60) -> dict[str, dict]:
    """SLURM's own record of these jobs (array tasks included): state and exit code by job id, once
    each has ended there (slurmctld reports a job's end to slurmdbd a moment after it ends)."""
    deadline = time.monotonic() + timeout_s
    while True:
        out = subprocess.run(["sacct", "-X", "-n", "--parsable2", "-o", "JobID,JobName,State,ExitCode,NodeList",
                              "-j", ",".join(job_ids)], capture_output=True, text=True, check=True, env=env).stdout
        jobs = {job: {"name": name, "state": state, "exit_code": code, "node": node}
                for job, name, state, code, node in (line.split("|") for line in out.splitlines())}
        running = [j for j in jobs.values() if j["state"] in ("PENDING", "RUNNING", "COMPLETING")]
        if (len(jobs) == len(job_ids) and not running) or time.monotonic() > deadline:
            return jobs
        time.sleep(0.5)


@contextlib.contextmanager
def postgres(root: Path):
    """A PostgreSQL cluster of its own on a loopback port, password login only; yields the URL of
    its empty database `mlflow`, owned by user mlflow. Its files are in `root`/data, or, as root,
    in a folder of the postgres user's (PostgreSQL refuses to run as root, and pytest's folders are
    root's alone), removed afterwards."""
    require(POSTGRES_COMMANDS, "PostgreSQL")
    import tempfile

    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    root.mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="pipeline-postgres-")) if as_postgres else root
    password, port = secrets.token_hex(12), free_port()
    (home / "password").write_text(password)
    if as_postgres:
        for path in (home, home / "password"):
            shutil.chown(path, "postgres", "postgres")
    try:
        call(*as_postgres, str(PG_BIN / "initdb"), "-D", str(home / "data"), "-U", "mlflow",
             f"--pwfile={home}/password", "--auth=scram-sha-256")
        env = {**os.environ, "PGPASSWORD": password}
        psql = ["psql", "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", "-v", "ON_ERROR_STOP=1"]
        with daemon([*as_postgres, str(PG_BIN / "postgres"), "-D", str(home / "data"), "-p", str(port), "-k", str(home),
                     "-c", "listen_addresses=127.0.0.1"], root / "postgres.log",
                    lambda: succeeds(*psql, "-d", "postgres", "-c", "SELECT 1", env=env)):
            call(*psql, "-d", "postgres", "-c", "CREATE DATABASE mlflow", env=env)
            yield f"postgresql://mlflow:{password}@127.0.0.1:{port}/mlflow"
    finally:
        if home != root:
            shutil.rmtree(home, ignore_errors=True)


def mlflow_server(root: Path, backend: str) -> Server:
    """`mlflow server --serve-artifacts` on loopback over this backend store: clients log artifacts
    through it, with no credentials for the artifact store of their own."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
               "--backend-store-uri", backend, "--serve-artifacts", "--artifacts-destination", str(root / "store")]
    # Without this the server forks job workers that outlive it.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return Server(command, port, root / "server.log", 180, ready_path="/health", env=env)
