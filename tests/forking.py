"""Run a check in a forked child, for tests of what survives fork()."""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable


def exit_code_in_child(check: Callable[[], bool], timeout_s: float) -> int | str:
    """Forks; the child exits 0 when ``check()`` is true, 1 when false, 2 when it raises. Returns that exit
    code, or "hung" when the child had not exited after ``timeout_s`` (it is then killed)."""
    with warnings.catch_warnings():  # "fork() in a multi-threaded process" is the point of these tests
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        code = 2
        try:
            code = 0 if check() else 1
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout_s
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            return "hung"
        time.sleep(0.01)
