"""No process outlives the cubeline command that started it, whatever signal ends the command.

Prefect starts its temporary API server as a plain subprocess and stops it from an ``atexit``
handler: a command ended by SIGKILL (or the OOM killer) never runs that handler, and the server
stays behind, listening. A parent-death signal (``PR_SET_PDEATHSIG``) does not help here: it
fires when the *thread* that started the child ends, and the server is started from a helper
thread. So every such child gets a watchdog (:mod:`tasks.watchdog`): a tiny interpreter
(``python -I -S``, standard library only) that polls its own parent -- the cubeline process --
and, once that is gone, stops the child (SIGTERM, then SIGKILL) and exits. It exits by itself as
soon as the child ends.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

#: The watchdog program (standard library only, run by path).
WATCHDOG = Path(__file__).with_name("watchdog.py")


def guard_child(pid: int) -> subprocess.Popen[bytes] | None:
    """Start a watchdog that stops process ``pid`` when this process dies.

    Args:
        pid: A child process of this one.

    Returns:
        The watchdog process (it ends by itself with the child), None if it could not start.
    """
    try:
        return subprocess.Popen(
            [sys.executable, "-I", "-S", str(WATCHDOG), str(os.getpid()), str(pid)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C meant for the command must not stop its guard
            close_fds=True,
        )
    except OSError:
        return None


_GUARDED = "_cubeline_guarded"


def guard_prefect_temporary_server() -> None:
    """Give every temporary Prefect API server this process starts a watchdog (idempotent).

    Wraps ``SubprocessASGIServer._run_uvicorn_command``, the one place Prefect 3 starts the
    server (also on its port-conflict retry), so every start path is covered.
    """
    from prefect.server.api.server import SubprocessASGIServer

    original = SubprocessASGIServer._run_uvicorn_command
    if getattr(original, _GUARDED, False):
        return

    def run_guarded(self: Any) -> subprocess.Popen[Any]:
        proc = original(self)
        guard_child(proc.pid)
        return proc

    setattr(run_guarded, _GUARDED, True)
    SubprocessASGIServer._run_uvicorn_command = run_guarded  # type: ignore[method-assign]


def probe_prefect_api(timeout_s: float = 3.0) -> None:
    """Fail fast, with one clear error, when ``PREFECT_API_URL`` names an API that is not there.

    Prefect's client otherwise retries for a while and fails with a chain of tracebacks.

    Raises:
        OrchestrationUnavailableError: Nothing answers ``<PREFECT_API_URL>/health`` in time.
    """
    import urllib.error
    import urllib.request

    from tasks.failures import OrchestrationUnavailableError

    url = os.environ.get("PREFECT_API_URL", "").strip()
    if not url:
        return
    health = url.rstrip("/") + "/health"
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(health, timeout=timeout_s):
            return
    except urllib.error.HTTPError:
        return  # something answered: Prefect reports the details on the first real call
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise OrchestrationUnavailableError(
            f"the Prefect API at PREFECT_API_URL={url} does not answer ({exc}). Fix: start it "
            "(prefect server start --host 127.0.0.1, or cubeline stack up), correct the URL, or "
            "unset PREFECT_API_URL to run on a temporary server"
        ) from None


def check_data_links(params: Any, params_path: Path) -> None:
    """Refuse dangling symbolic links in the folders of ``data.paths`` before anything starts.

    DVC hashes those folders and would fail on such a link only after the server start-up.

    Raises:
        StorageError: A link whose target does not exist (named, with the fix).
    """
    from nodes.errors import StorageError
    from tasks.params import resolve_path

    folders = {resolve_path(params_path, p).parent for p in params.data.paths}
    for folder in sorted(folders):
        if not folder.is_dir():
            continue  # restored by `dvc pull` in the load step
        for entry in folder.rglob("*"):
            if entry.is_symlink() and not entry.exists():
                raise StorageError(
                    f"{entry} is a dangling symbolic link (its target {os.readlink(entry)} does "
                    "not exist). Fix: remove the link or restore its target (`dvc pull` for "
                    "data/)"
                )


def bound_runner_shutdown(grace_s: float = 10.0) -> None:
    """SIGTERM ends ``cubeline serve`` (and a worker) within ``grace_s``, whatever the API does.

    Prefect's runner answers SIGTERM with a graceful stop that talks to the API; with the API gone
    that stop can hang, and the process stayed up. After the graceful stop is asked for, a timer
    ends the process (exit handlers first: the watchdogs stop any child); a second SIGTERM ends
    it at once.
    """
    import atexit
    import threading

    from prefect.runner.runner import Runner

    from tasks.failures import EXIT_INTERRUPTED

    original = Runner.handle_sigterm
    if getattr(original, _GUARDED, False):
        return

    def leave() -> None:
        print("cubeline serve: error: stopped by SIGTERM; the runner did not finish its "
              f"graceful stop within {grace_s:g} s. Fix: none needed, start it again",
              file=sys.stderr, flush=True)
        with contextlib.suppress(Exception):
            atexit._run_exitfuncs()
        os._exit(EXIT_INTERRUPTED)

    def handle(self: Any, *args: Any, **kwargs: Any) -> None:
        if getattr(self, "_cubeline_stopping", False):
            leave()
        self._cubeline_stopping = True
        timer = threading.Timer(grace_s, leave)
        timer.daemon = True
        timer.start()
        original(self, *args, **kwargs)

    setattr(handle, _GUARDED, True)
    Runner.handle_sigterm = handle  # type: ignore[method-assign]


_signalled: list[int] = []


def note_signal(signum: int) -> None:
    """Record that SIGINT/SIGTERM asked this process to stop.

    Libraries may turn the interrupt into something else (Lightning's SystemExit); the run is
    still closed KILLED.
    """
    _signalled.append(signum)


def interrupted(exc: BaseException | None = None) -> bool:
    """Whether SIGINT or SIGTERM asked this process to stop.

    Args:
        exc: The exception that ends it, if any (Prefect turns SIGTERM inside a flow into its
            ``TerminationSignal``).
    """
    if exc is not None:
        names = {c.__name__ for c in type(exc).__mro__}
        if names & {"KeyboardInterrupt", "TerminationSignal", "ExternalSignal"}:
            return True
    return bool(_signalled)
