"""`vllm serve` as a child process, for the benchmarks and the tests: listening on loopback at
a free port, logging to its own file, healthy before use, and stopped by its process group even
when the caller fails, so that no engine core or worker outlives it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """A context manager running `vllm serve MODEL --host 127.0.0.1 --port PORT ARGS` with
    `env`; `.url`, `.log()`, `.startup_s`. `cmd` and `env` may be changed before entering."""

    def __init__(self, vllm: str, model: str, args: list[str], env: dict[str, str],
                 log_path: Path, startup_timeout: float = 240):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [vllm, "serve", model, "--host", "127.0.0.1", "--port", str(self.port),
                    *args]
        self.env = env
        self.log_path = log_path
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None

    def __enter__(self):
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.perf_counter() - t0
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _wait_healthy(self) -> None:
        import httpx

        deadline = time.time() + self.startup_timeout
        with httpx.Client(trust_env=False, timeout=2) as client:   # loopback: no proxies
            while time.time() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"vllm serve exited with {self.proc.returncode}, log "
                                       f"{self.log_path}:\n{self.log()[-4000:]}")
                try:
                    if client.get(self.url + "/health").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(1)
        raise TimeoutError(f"vllm serve did not become healthy, log {self.log_path}:\n"
                           + self.log()[-4000:])

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        pgid = os.getpgid(self.proc.pid)
        os.killpg(pgid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        try:  # children that outlived the parent
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def start_all(stack, servers: dict) -> dict:
    """Start several ServeProcess servers at once (most of a start is each engine's own
    profiling and warm-up, which overlap) and register each one's stop with `stack` (an
    ExitStack), so all are stopped, also when one fails to start. Returns `servers`."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(len(servers), 1)) as pool:
        futures = [pool.submit(s.__enter__) for s in servers.values()]
        for s in servers.values():
            stack.callback(s.stop)
        for f in futures:
            f.result()   # the first startup failure; the stack stops the others
    return servers
