"""Start a local OpenAI-compatible judge server (`vllm serve`, or any command) for as long as a `with` block.

Used by the judge-concurrency and rl-step benchmarks and the tests (with the `llm-katan` echo
server). No notebook starts a server itself: on a GPU machine, wrap a stage in `JudgeServer(model)`
or run the printed command (on this node or another), then point the judge's endpoint `base_url`
at it. Also home of `free_port`, which qedlib.launch uses for its rendezvous port.
"""
from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


class JudgeServerError(RuntimeError):
    """The server did not come up (exited, or never became healthy); the message holds its log tail."""


def free_port() -> int:
    """A TCP port free on this machine right now (a local server, or the rendezvous of a single-node launch)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_serve_command(model: str, port: int, host: str = "127.0.0.1", extra_args: list | tuple = ()) -> list[str]:
    """The `vllm serve` command line for a judge model."""
    return ["vllm", "serve", model, "--host", host, "--port", str(port), *map(str, extra_args)]


def katan_echo_command(port: int, latency_ms: int = 0, max_concurrent: int = 32, extra_args: list | tuple = ()) -> list[str]:
    """An `llm-katan` echo-backend server command (tests, benchmarks; its flags inject faults)."""
    exe = Path(sys.executable).with_name("llm-katan")
    return [str(exe) if exe.exists() else "llm-katan", "--model", "echo", "--backend", "echo", "--host", "127.0.0.1",
            "--port", str(port), "--latency-ms", str(latency_ms), "--max-concurrent", str(max_concurrent),
            "--stats-file", os.path.join(tempfile.gettempdir(), f"llm-katan-stats-{port}.json"),
            "--disable-dashboard", *map(str, extra_args)]


class JudgeServer:
    """Context manager: start the server, wait for /health or /v1/models, stop it at exit.

    `JudgeServer(model, port, extra_args)` runs `vllm serve model`; pass `command` to run anything
    else that serves the OpenAI API on `port`. `base_url` is what a judge Endpoint needs.
    """

    def __init__(self, model: str | None = None, port: int | None = None, extra_args: list | tuple = (),
                 command: list[str] | None = None, host: str = "127.0.0.1", startup_timeout_s: float = 900.0,
                 log_path: str | Path | None = None, api_key_env: str | None = None):
        if command is None and not model:
            raise ValueError("JudgeServer needs a model (for `vllm serve`) or a command")
        self.port = port or free_port()
        self.host = host
        self.command = list(command) if command else vllm_serve_command(model, self.port, host, extra_args)
        self.startup_timeout_s = startup_timeout_s
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="judge-server-", suffix=".log")[1])
        self.api_key_env = api_key_env
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        """OpenAI-compatible base URL (…/v1) of the server."""
        return f"http://{self.host}:{self.port}/v1"

    def command_line(self) -> str:
        """The exact shell command (to run it on another node instead)."""
        return shlex.join(self.command)

    def log_tail(self, n: int = 30) -> str:
        """The last `n` lines of the server's log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def _healthy(self) -> bool:
        import httpx  # heavy: httpx (~0.1 s) loads only to call a server
        headers = {}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        root = f"http://{self.host}:{self.port}"
        for path in ("/health", "/v1/models"):
            try:
                if httpx.get(root + path, timeout=2.0, headers=headers).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
        return False

    def start(self) -> "JudgeServer":
        """Start the process and block until it answers, or raise JudgeServerError with its log tail."""
        print(f"judge server: {self.command_line()}  (log: {self.log_path})", flush=True)
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        except FileNotFoundError as e:
            log.close()
            raise JudgeServerError(f"cannot start {self.command[0]!r}: {e}; install it (vllm needs the `gpu` extra) "
                                   f"or pass command=[...]") from None
        log.close()
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                raise JudgeServerError(f"judge server exited with code {code} before becoming healthy:\n{self.log_tail()}")
            if self._healthy():
                print(f"judge server ready at {self.base_url}", flush=True)
                return self
            time.sleep(0.2)
        self.stop()
        raise JudgeServerError(f"judge server not healthy after {self.startup_timeout_s:.0f}s:\n{self.log_tail()}")

    def stop(self, grace_s: float = 10.0) -> None:
        """Terminate the server's process group (SIGTERM, then SIGKILL after `grace_s`)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(5)
        self.proc = None

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> "JudgeServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
