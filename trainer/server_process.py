"""Run `vla-mbpo serve` as a child process on a free localhost port, for the demo and end-to-end tests.

The trainer never imports the server: it starts the real CLI, waits until the standard gRPC health
service reports SERVING, and stops it with SIGTERM (the server drains and releases every state).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


class ServerStartError(RuntimeError):
    """The server process exited or did not report SERVING in time; the message carries its log tail."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """`with ServerProcess(checkpoint) as server: WorldModelClient(server.target)`."""

    def __init__(self, checkpoint: Path, log_path: Path, extra_args: list[str] | None = None,
                 host: str = "127.0.0.1", startup_timeout: float = 300.0) -> None:
        self.checkpoint, self.log_path, self.host = Path(checkpoint), Path(log_path), host
        self.extra_args = list(extra_args or [])
        self.startup_timeout = startup_timeout
        self.port = 0
        self.process: subprocess.Popen | None = None

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> ServerProcess:
        self.port = free_port(self.host)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "vla_mbpo.cli", "serve", "--checkpoint", str(self.checkpoint),
                   "--host", self.host, "--port", str(self.port), *self.extra_args]
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
        self._wait_serving()
        return self

    def _wait_serving(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise ServerStartError(f"vla-mbpo serve exited with {self.process.returncode}:\n{self.log_tail()}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.5)
        self.stop()
        raise ServerStartError(f"vla-mbpo serve not SERVING on {self.target} after {self.startup_timeout}s:\n"
                               f"{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_path.is_file():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM, wait, SIGKILL as a last resort. Returns the exit code."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
