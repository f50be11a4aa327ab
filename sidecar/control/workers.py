"""``sidecar run --workers N``: N processes sharing the listening ports.

The supervisor reserves the ports (a bound, non-listening SO_REUSEPORT socket each,
so port 0 still means "any free port" and every worker gets the same one), points
prometheus-client's multiprocess mode at a fresh folder so /metrics on any worker
sums all of them, and starts the workers, which bind the same ports with
SO_REUSEPORT: the kernel spreads connections across them.

SIGTERM or SIGINT is passed to every worker, each drains its own requests, and the
supervisor exits 0 when all have. SIGHUP is passed on too, so every worker reloads.
A worker that dies unexpectedly is restarted (at most 5 times a minute) with the
config in service: the supervisor keeps a copy of the one it started with, replaced
at a SIGHUP when the file then loads, so a file edited but not reloaded (or broken:
a replacement that cannot start used to stop every worker) is not what a lone
replacement serves. A worker whose supervisor is gone (killed, OOM) drains and exits
by itself, and signals only the supervisor it was started by. The folder of a
supervisor killed outright (no cleanup runs) is removed by the next one to start.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from types import FrameType

from sidecar.config.plan import load_plan
from sidecar.config.schema import ConfigError, LoadedConfig, cannot_listen

_RESTARTS_PER_MINUTE = 5
_CGROUP = Path("/sys/fs/cgroup")


def available_cpus(cgroup: Path = _CGROUP) -> int:
    """CPUs this process may use: the cgroup's CPU quota (what a container limit sets),
    else the CPUs it may be scheduled on; at least 1. A pod limited to 1.5 CPUs on a
    64-core node gets 2 workers, not 64."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    quota = _cgroup_quota(cgroup)
    count = allowed or 1
    if quota is not None:
        count = min(count, math.ceil(quota))
    return max(1, count)


def _cgroup_quota(cgroup: Path) -> float | None:
    """CPUs of quota: cgroup v2 ``cpu.max`` ("max 100000" or "150000 100000"), else v1."""
    try:
        quota, _, period = (cgroup / "cpu.max").read_text().partition(" ")
        if quota.strip() == "max":
            return None
        return int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        v1_quota = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
        v1_period = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return v1_quota / v1_period if v1_quota > 0 and v1_period > 0 else None


def _reserve(source: str, key: str, host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise cannot_listen(source, f"{key}.port", host, port, exc) from None
    return sock


_FOLDER_PREFIX = "sidecar-metrics-"  # then the supervisor's pid, a dash, mkdtemp's letters
_OUR_FOLDERS: set[str] = set()


def _remove_folders_of_dead_supervisors() -> None:
    """A supervisor killed with SIGKILL leaves its folder (the workers' metric files,
    the config copy); a container restarted in place keeps its /tmp. Removed when
    the process named in it is gone, or is this one without having made it (in a
    container the supervisor is often pid 1 at every start). Another user's folders,
    and those of a live process, are left alone."""
    base = Path(tempfile.gettempdir())
    me = os.getpid()
    for path in base.glob(f"{_FOLDER_PREFIX}*-*"):
        pid_text = path.name[len(_FOLDER_PREFIX) :].split("-", 1)[0]
        if not pid_text.isdigit() or str(path) in _OUR_FOLDERS:
            continue
        try:
            if path.is_symlink() or not path.is_dir() or path.stat().st_uid != os.getuid():
                continue
        except OSError:
            continue
        pid = int(pid_text)
        if pid != me and _alive(pid):
            continue
        shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


class Supervisor:
    def __init__(self, loaded: LoadedConfig, workers: int) -> None:
        self.loaded = loaded
        self.count = workers
        config = loaded.config
        source = str(loaded.path)
        self._main = _reserve(source, "listen", config.listen.host, config.listen.port)
        self.port = self._main.getsockname()[1]
        try:
            self._admin = (
                _reserve(source, "admin", config.admin.host, config.admin.port)
                if config.admin.enabled
                else None
            )
        except ConfigError:
            self._main.close()
            raise
        self.admin_port = self._admin.getsockname()[1] if self._admin else 0
        _remove_folders_of_dead_supervisors()
        self._metrics_dir = tempfile.mkdtemp(prefix=f"{_FOLDER_PREFIX}{os.getpid()}-")
        _OUR_FOLDERS.add(self._metrics_dir)
        # In the supervisor's own folder (mode 0700: the file may hold key digests).
        self._config_copy = Path(self._metrics_dir) / "config-in-service.yaml"
        self._keep(loaded.data)
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
            "--supervisor-pid",
            str(os.getpid()),
            "--config-in-service",
            str(self._config_copy),
        ]
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": self._metrics_dir}
        # The worker starts with SIGHUP blocked, not at its default (which ends the
        # process): a reload passed on while it starts stays pending until it can
        # reload (``serve`` unblocks it), instead of killing it and spending a restart.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            return subprocess.Popen(argv, env=env)  # noqa: S603 - our own module, no shell
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def _forward(self, signum: int, frame: FrameType | None) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self._stopping = True
            signum = signal.SIGTERM
        for child in self._children:
            if child.poll() is None:
                child.send_signal(signum)
        if signum == signal.SIGHUP:
            self._adopt()

    def _adopt(self) -> None:
        """At a reload: the file, when it loads, is the config in service (each worker
        reloads it itself, and logs why when it does not load)."""
        try:
            loaded = load_plan(self.loaded.path).loaded
        except ConfigError:
            return
        self.loaded = loaded
        self._keep(loaded.data)

    def _keep(self, data: bytes) -> None:
        """The copy replacement workers start from (whole, never half written)."""
        partial = self._config_copy.with_suffix(".partial")
        partial.write_bytes(data)
        partial.replace(self._config_copy)

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
                    return exit_code(self._stopping, [c.returncode for c in self._children])
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


def exit_code(stopping: bool, codes: list[int]) -> int:
    """The supervisor's: 0 when it was told to stop and every worker stopped cleanly.
    A worker still starting when the SIGTERM came dies of it (its handler is not in
    place yet): with nothing served yet, that is a clean stop too."""
    clean = all(code in (0, -signal.SIGTERM) for code in codes)
    return 0 if stopping and clean else 1


def _mark_dead(pid: int, directory: str) -> None:
    from prometheus_client import multiprocess

    from sidecar.telemetry.metrics import forget_worker

    multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]
    forget_worker(directory, pid)
