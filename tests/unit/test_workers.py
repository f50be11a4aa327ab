"""The supervisor's exit code, from its workers' (processes: tests/system/test_workers.py)."""

from __future__ import annotations

import signal

from sidecar.control.workers import exit_code


def test_a_clean_stop_is_zero() -> None:
    assert exit_code(True, [0, 0]) == 0


def test_a_worker_the_sigterm_found_still_starting_stopped_cleanly() -> None:
    # Its handler was not in place yet: the signal's default action ended it.
    assert exit_code(True, [0, -signal.SIGTERM]) == 0


def test_any_other_end_is_a_failure() -> None:
    assert exit_code(False, [0, 0]) == 1  # the workers ended by themselves
    assert exit_code(False, [-signal.SIGTERM]) == 1  # killed from outside, not stopped
    assert exit_code(True, [0, 1]) == 1
    assert exit_code(True, [0, -signal.SIGKILL]) == 1
    assert exit_code(True, [-signal.SIGSEGV]) == 1
