"""An OpenAI-compatible server process: started on a free loopback port, waited for, measured,
and always stopped with its children, on every way out."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from pipeline.contract import PipelineError, last_words


class ServerError(PipelineError):
    """The server did not come up, or died; the message ends with the tail of its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def log_tail(path: Path, lines: int = 30) -> str:
    text = Path(path).read_text(errors="replace") if Path(path).exists() else ""
    return "\n".join(text.splitlines()[-lines:])


class Server:
    """`with Server(command, port, log) as server:` runs `command` until the block ends."""

    def __init__(self, command: list[str], port: int, log: Path, ready_timeout_s: float, ready_path: str = "/health",
                 env: dict | None = None):
        # llama-server and vLLM answer /health with 200 once the model is loaded (llama-server: 503 before).
        self.command, self.port, self.log, self.ready_timeout_s = command, port, Path(log), ready_timeout_s
        self.ready_path, self.env = ready_path, env
        self.url = f"http://127.0.0.1:{port}"
        self.peak_rss_mb = 0.0
        self.peak_gpu_mb = None  # stays None without an NVIDIA GPU
        self.process = None
        self._stop_polling = threading.Event()

    def __enter__(self):
        with open(self.log, "w") as log:
            # A session of its own, so that stopping it reaches every child it spawns.
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                            env=self.env)
        threading.Thread(target=self._poll_memory, daemon=True).start()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()

    def _wait_ready(self) -> None:
        import httpx

        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            self.raise_if_dead("exited before it was ready")
            try:
                if httpx.get(f"{self.url}{self.ready_path}", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise ServerError(f"{self.command[0]} did not answer {self.url}{self.ready_path} within {self.ready_timeout_s} s; "
                          f"its log ({self.log}) ends: {last_words(log_tail(self.log))}")

    def raise_if_dead(self, what: str = "died") -> None:
        if self.process.poll() is not None:
            raise ServerError(f"The server {what} (exit code {self.process.returncode}): "
                              f"{last_words(log_tail(self.log))} (its log: {self.log})")

    def _poll_memory(self) -> None:
        import psutil

        gpus = _gpu_handles()
        while not self._stop_polling.wait(0.2):
            try:
                root = psutil.Process(self.process.pid)
                tree = [root, *root.children(recursive=True)]
                rss = sum(p.memory_info().rss for p in tree)
            except psutil.Error:
                return
            self.peak_rss_mb = max(self.peak_rss_mb, rss / 2**20)
            if gpus:
                self.peak_gpu_mb = max(self.peak_gpu_mb or 0.0, _gpu_memory_mb(gpus, {p.pid for p in tree}))

    def stop(self) -> None:
        import psutil

        self._stop_polling.set()
        if self.process is None:
            return
        if self.process.poll() is None:
            family = []
            with contextlib.suppress(psutil.Error):
                family = psutil.Process(self.process.pid).children(recursive=True)
            # While the server runs its pid is its group's id; once it is reaped, that number may name
            # another process (pids wrap at 32768 on many machines), so signals go out only now.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
            for child in family:  # whatever ignored SIGTERM; psutil checks it is still the same process
                with contextlib.suppress(psutil.Error):
                    child.kill()
        self.process.wait()


def _gpu_handles() -> list:
    try:
        import pynvml

        pynvml.nvmlInit()
        return [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
    except Exception:  # no NVIDIA driver, no GPU: nothing to sample
        return []


def _gpu_memory_mb(handles: list, pids: set[int]) -> float:
    import pynvml

    used = 0
    for handle in handles:
        for process in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if process.pid in pids and process.usedGpuMemory:
                used += process.usedGpuMemory
    return used / 2**20
