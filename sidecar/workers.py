"""``sidecar run --workers N``: N processes sharing the listening ports.

The supervisor reserves the ports (a bound, non-listening SO_REUSEPORT socket each,
so port 0 still means "any free port" and every worker gets the same one), points
prometheus-client's multiprocess mode at a fresh folder so /metrics on any worker
sums all of them, and starts the workers, which bind the same ports with
SO_REUSEPORT: the kernel spreads connections across them.

SIGTERM or SIGINT is passed to every worker, each drains its own requests, and the
supervisor exits 0 when all have. SIGHUP is passed on too, so every worker reloads.
A worker that dies unexpectedly is restarted (at most 5 times a minute).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from types import FrameType

from sidecar.config import LoadedConfig

_RESTARTS_PER_MINUTE = 5


def _reserve(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


class Supervisor:
    def __init__(self, loaded: LoadedConfig, workers: int) -> None:
        self.loaded = loaded
        self.count = workers
        config = loaded.config
        self._main = _reserve(config.listen.host, config.listen.port)
        self.port = self._main.getsockname()[1]
        self._admin = (
            _reserve(config.admin.host, config.admin.port) if config.admin.enabled else None
        )
        self.admin_port = self._admin.getsockname()[1] if self._admin else 0
        self._metrics_dir = tempfile.mkdtemp(prefix="sidecar-metrics-")
        self._children: list[subprocess.Popen[bytes]] = []
        self._stopping = False
        self._restarts: deque[float] = deque()

    def _spawn(self) -> subprocess.Popen[bytes]:
        argv = [
            sys.executable,
            "-m",
            "sidecar",
            "run",
            "--config",
            str(self.loaded.path),
            "--worker-port",
            str(self.port),
            "--worker-admin-port",
            str(self.admin_port),
        ]
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": self._metrics_dir}
        return subprocess.Popen(argv, env=env)  # noqa: S603 - our own module, no shell

    def _forward(self, signum: int, frame: FrameType | None) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self._stopping = True
            signum = signal.SIGTERM
        for child in self._children:
            if child.poll() is None:
                child.send_signal(signum)

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._forward)
        try:
            self._children = [self._spawn() for _ in range(self.count)]
            while True:
                for index, child in enumerate(self._children):
                    if child.poll() is None:
                        continue
                    _mark_dead(child.pid, self._metrics_dir)
                    if self._stopping:
                        continue
                    if not self._may_restart():
                        print("sidecar: workers keep dying; stopping", file=sys.stderr)
                        self._forward(signal.SIGTERM, None)
                        continue
                    self._children[index] = self._spawn()
                if all(child.poll() is not None for child in self._children):
                    codes = [child.returncode for child in self._children]
                    return 0 if self._stopping and all(c == 0 for c in codes) else 1
                time.sleep(0.2)
        finally:
            self._main.close()
            if self._admin is not None:
                self._admin.close()
            shutil.rmtree(self._metrics_dir, ignore_errors=True)

    def _may_restart(self) -> bool:
        now = time.monotonic()
        while self._restarts and now - self._restarts[0] > 60:
            self._restarts.popleft()
        if len(self._restarts) >= _RESTARTS_PER_MINUTE:
            return False
        self._restarts.append(now)
        return True


def _mark_dead(pid: int, directory: str) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]
