"""The interpreter settings a serving process takes (in a child process: freezing the
test runner's own heap would change every later test)."""

from __future__ import annotations

import subprocess
import sys

CHILD = """
import gc, sys
from sidecar.control import interpreter
before = gc.get_freeze_count()
interpreter.settle()
print(
    before,
    gc.get_freeze_count() > 1000,
    sys.getswitchinterval() == interpreter.SWITCH_INTERVAL,
)
"""


def test_settle_freezes_the_start_up_heap_and_shortens_thread_switches() -> None:
    out = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.split() == ["0", "True", "True"]
