"""``teacher-server`` processes on loopback ports, for the benchmarks."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from services.teacher_server.client import RemoteTeacher

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_teacher_server(checkpoint: str | Path, threads: int, *extra_args: str) -> tuple[subprocess.Popen, str]:
    """Start a server for ``checkpoint`` (``extra_args`` added to its command line) and wait until it
    serves; returns (process, "127.0.0.1:PORT")."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "services.teacher_server.server", "--checkpoint", str(checkpoint), "--host",
         "127.0.0.1", "--port", str(port), "--http-port", "-1", "--threads", str(threads), "--log-level", "WARNING",
         *extra_args],
        cwd=REPO,
    )
    address = f"127.0.0.1:{port}"
    RemoteTeacher(address, connect_timeout_s=120).close()
    return process, address


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait(timeout=60)
