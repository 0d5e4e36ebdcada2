"""The watchdog program of :mod:`tasks.lifecycle`, and the one liveness check of the project.

Standard library only: :func:`tasks.lifecycle.guard_child` runs this file by path in an isolated
interpreter (``python -I -S tasks/watchdog.py <parent pid> <child pid>``), so it starts at once and
cannot be affected by the environment of the command it guards. It polls the parent; once the
parent is gone it stops the child (SIGTERM, then SIGKILL after 5 s) and exits. It exits by itself
as soon as the child ends.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time


def process_alive(pid: int) -> bool:
    """Whether a process with ``pid`` runs on this host (another user's counts; a zombie not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError), open(f"/proc/{pid}/stat", "rb") as f:
        if f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X"):
            return False
    return True


def watch(parent: int, child: int, poll_s: float = 0.2, grace_s: float = 5.0) -> None:
    """Stop ``child`` once ``parent`` is gone; return when either has ended.

    Args:
        parent: The guarded command's pid (this watchdog's parent).
        child: The process to stop when the command dies.
        poll_s: How often to look.
        grace_s: How long SIGTERM has before SIGKILL.
    """
    while process_alive(child) and os.getppid() == parent:
        time.sleep(poll_s)
    if not process_alive(child):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(child, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            time.sleep(0.1)
            if not process_alive(child):
                return
        os.kill(child, signal.SIGKILL)


if __name__ == "__main__":
    watch(int(sys.argv[1]), int(sys.argv[2]))
