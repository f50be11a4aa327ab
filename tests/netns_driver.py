"""Run a plan of shell commands inside a private network namespace (``unshare -n``).

The documented commands use the documented ports (8080, 8081, 9901, 8000); in a
namespace of their own those are always free, and only its loopback exists.
Started by tests/system/test_documented_commands.py as

    unshare -n python tests/netns_driver.py PLAN.json RESULTS.json

A plan is a list of steps, run in order:

    {"start": CMD, "name": N, "wait": URL}   start CMD in the background (bash -c) and
                                             wait (bounded) until URL answers 200
    {"run": CMD, "name": N, "timeout": S}    run CMD (bash -c) and record its exit
                                             code, stdout and stderr
    {"stop": N, "signal": "SIGTERM"}         signal a started command, wait for it

Every step may carry "cwd" and "env" (added to the environment). Everything started
and still running at the end gets SIGINT, then SIGKILL after 30 s.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

WAIT_SECONDS = 90.0


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - loopback only
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def main(plan_path: str, results_path: str) -> int:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    plan: list[dict[str, Any]] = json.loads(Path(plan_path).read_text())
    out_dir = Path(results_path).parent
    started: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
    results: dict[str, Any] = {}
    for step in plan:
        env = {**os.environ, **step.get("env", {})}
        cwd = step.get("cwd")
        if "start" in step:
            name = step["name"]
            log = out_dir / f"{name}.log"
            with log.open("wb") as sink:
                process = subprocess.Popen(
                    ["bash", "-c", step["start"]],
                    cwd=cwd,
                    env=env,
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            started[name] = (process, log)
            deadline = time.monotonic() + WAIT_SECONDS
            ready = False
            while time.monotonic() < deadline and process.poll() is None:
                if _answers(step["wait"]):
                    ready = True
                    break
                time.sleep(0.1)
            results[name] = {"ready": ready, "exited": process.poll()}
            if not ready:
                break
        elif "run" in step:
            try:
                done = subprocess.run(
                    ["bash", "-c", step["run"]],
                    cwd=cwd,
                    env=env,
                    capture_output=True,
                    timeout=step.get("timeout", 120),
                    check=False,
                )
                results[step["name"]] = {
                    "rc": done.returncode,
                    "stdout": done.stdout.decode(errors="replace"),
                    "stderr": done.stderr.decode(errors="replace"),
                }
            except subprocess.TimeoutExpired:
                results[step["name"]] = {"rc": None, "stdout": "", "stderr": "timed out"}
        elif "stop" in step:
            process, log = started.pop(step["stop"])
            _stop(process, getattr(signal, step.get("signal", "SIGINT")))
            results[step["stop"]]["rc"] = process.returncode
            results[step["stop"]]["log"] = log.read_text(errors="replace")
    for name, (process, log) in started.items():
        _stop(process, signal.SIGINT)
        results[name]["rc"] = process.returncode
        results[name]["log"] = log.read_text(errors="replace")
    Path(results_path).write_text(json.dumps(results))
    return 0


def _stop(process: subprocess.Popen[bytes], signum: int) -> None:
    if process.poll() is None:
        # The whole session: `bash -c` and what it started (scripts/demo execs, but a
        # command with a pipe or an env prefix runs as bash's child).
        os.killpg(process.pid, signum)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
