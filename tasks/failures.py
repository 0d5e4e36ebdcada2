"""How a cubeline command fails: one error line, an exit code by kind, never a raw traceback.

Every failure a user can cause ends with exactly one line on stderr::

    cubeline <command>: error: <what went wrong>, <where>. Fix: <what to do>

and an exit code that says which kind of failure it was (:data:`EXIT_CODES`, also the table of
the README's "Failure behaviour"). cubeline's own errors (:class:`~nodes.errors.CubelineError`)
carry their message; the libraries' exceptions that a user can cause -- a full or read-only disk,
a corrupt ``mlflow.db``, an unreachable Prefect API -- are translated here, in one place, by
class. Anything else is a bug: it gets :data:`EXIT_INTERNAL` and the same one line, pointing at
``-v`` for the traceback.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from collections.abc import Iterator
from dataclasses import dataclass

from nodes.errors import (
    ConfigError,
    ContentHashError,
    CubelineError,
    DataValidationError,
    DegenerateStatisticsError,
    StorageError,
    TrainingError,
)

#: Exit code of an unexpected exception (a bug): sysexits' EX_SOFTWARE.
EXIT_INTERNAL = 70
#: Exit code of a command stopped by SIGINT or SIGTERM (128 + SIGINT, the shell's convention).
EXIT_INTERRUPTED = 130


class OrchestrationUnavailableError(CubelineError):
    """The Prefect API named by ``PREFECT_API_URL`` cannot be reached."""


@dataclass(frozen=True)
class ExitCode:
    """One kind of failure.

    Attributes:
        name: The exception class (by name: the registry and tracking errors live above nodes).
        code: The process exit code.
        meaning: What happened, for the README table.
        next_step: What the user does next.
    """

    name: str
    code: int
    meaning: str
    next_step: str


#: Exit codes by kind of failure, most specific class first (the README's "Failure behaviour").
EXIT_CODES: tuple[ExitCode, ...] = (
    ExitCode("DegenerateStatisticsError", 8, "Phase 1 statistics cannot give a detector "
             "(zero-variance bands, singular covariance, non-finite scores or threshold)",
             "check the training frames, or set phase1.degenerate: ridge with phase1.ridge"),
    ExitCode("ContentHashError", 10, "a file on disk does not match the content hash recorded for "
             "it (cache object, initialization state, model weights)",
             "restore it (dvc checkout / dvc pull) or re-register the model; do not use it"),
    ExitCode("StorageError", 9, "a file or folder cannot be read or written (disk full, "
             "read-only, permission, not a directory, dangling link)",
             "free space or fix permissions at the path named, or choose another location"),
    ExitCode("OrchestrationUnavailableError", 11, "the Prefect API at PREFECT_API_URL does not "
             "answer", "start it (prefect server start / cubeline stack up) or unset "
             "PREFECT_API_URL to use a temporary server"),
    ExitCode("DataValidationError", 3, "an input file, frame or annotation is invalid",
             "fix or replace the file named; `dvc pull` restores the bundled data"),
    ExitCode("RegistryError", 4, "the model registry refused the operation",
             "see the message (version, alias); `cubeline history` shows the champion's story"),
    ExitCode("TrackingUnavailableError", 5, "the MLflow store cannot be reached, opened or "
             "written", "start the server, or restore / move aside the mlflow.db named"),
    ExitCode("LockTimeoutError", 6, "another cubeline command holds the store's lock",
             "wait for it to finish, then run again"),
    ExitCode("TrainingError", 7, "Phase 2 cannot start or had to stop",
             "see the message (optimizer, loss, checkpoint); rerun with -v for details"),
    ExitCode("ConfigError", 2, "params.yaml, a pipeline YAML or an argument is invalid",
             "fix the field named (the message gives the file and the allowed values)"),
    ExitCode("CubelineError", 2, "another cubeline error", "see the message"),
    ExitCode("KeyboardInterrupt", EXIT_INTERRUPTED, "stopped by Ctrl-C or SIGTERM; the run is "
             "marked KILLED, servers and workers stopped", "run again (Phase 2 resumes from "
             "its last checkpoint)"),
    ExitCode("Exception", EXIT_INTERNAL, "an unexpected error: a bug",
             "rerun with -v and report the traceback"),
)


def exit_code(exc: BaseException) -> int:
    """The exit code of an exception: the first row of :data:`EXIT_CODES` it is an instance of.

    Args:
        exc: The exception (after :func:`user_error`, or a raw one).

    Returns:
        The code; :data:`EXIT_INTERNAL` for anything that is not a cubeline error.
    """
    names = {c.__name__ for c in type(exc).__mro__}
    return next((row.code for row in EXIT_CODES if row.name in names), EXIT_INTERNAL)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then its causes and contexts (and a group's members), each once."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo.extend(getattr(e, "exceptions", ()) or ())
        for nxt in (e.__cause__, e.__context__):
            if nxt is not None:
                todo.append(nxt)


def _where(exc: BaseException) -> str:
    """``file:line`` of the innermost frame of ``exc``'s traceback (empty without one)."""
    tb = exc.__traceback__
    if tb is None:
        return ""
    frame = traceback.extract_tb(tb)[-1]
    return f"{frame.filename}:{frame.lineno}"


def _os_error(exc: OSError) -> CubelineError:
    path = exc.filename or ""
    where = f" at {path}" if path else ""
    code = exc.errno
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return StorageError(f"no space left on the device{where}. Fix: free space there, or "
                            "point the output/store at another disk")
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return StorageError(f"cannot write{where}: {exc.strerror}. Fix: make it writable or "
                            "choose another location (--out, --params, mlflow.tracking_uri)")
    if code == errno.ENOENT and path and os.path.islink(path):
        return StorageError(f"{path} is a dangling symbolic link (its target "
                            f"{os.readlink(path)} does not exist). Fix: remove the link or "
                            "restore its target (`dvc pull` for data/)")
    if code == errno.ENOENT:
        return StorageError(f"file not found{where}. Fix: check the path; `dvc pull` restores "
                            "the bundled data, `dvc checkout` the outputs")
    if code in (errno.ENOTDIR, errno.EISDIR, errno.EEXIST):
        return StorageError(f"{exc.strerror}{where}. Fix: a file stands where a folder is "
                            "expected (or the reverse): move it aside or choose another path")
    return StorageError(f"{exc.strerror or exc}{where}. Fix: check the path and the disk")


def _foreign(exc: BaseException) -> CubelineError | None:
    """A user-caused failure of a library, as a cubeline error; None for a bug."""
    names = {c.__name__ for c in type(exc).__mro__}
    text = " ".join(str(exc).split())[:400]
    if {"ConnectError", "ConnectTimeout", "PrefectHTTPStatusError"} & names or (
        isinstance(exc, RuntimeError) and "Failed to reach API" in text
    ):
        url = os.environ.get("PREFECT_API_URL", "the temporary Prefect server")
        return OrchestrationUnavailableError(
            f"the Prefect API at {url} does not answer ({text}). Fix: start it "
            "(prefect server start --host 127.0.0.1, or cubeline stack up) or unset "
            "PREFECT_API_URL to run on a temporary server"
        )
    if {"DatabaseError", "OperationalError"} & names:
        from tasks.tracking.store import TrackingUnavailableError

        return TrackingUnavailableError(
            f"the MLflow store cannot be read or written ({text}). Fix: check that mlflow.db "
            "is a SQLite file on a writable disk; restore it from a backup or move it aside "
            "(a new empty store is then created)"
        )
    if "MlflowException" in names:
        if "Invalid model name" in text or "INVALID_PARAMETER_VALUE" in text:
            return ConfigError(f"MLflow refused a value: {text}. Fix: correct it in params.yaml")
        from tasks.tracking.store import TrackingUnavailableError

        return TrackingUnavailableError(f"MLflow failed: {text}. Fix: check the tracking store")
    if isinstance(exc, OSError):
        return _os_error(exc)
    if isinstance(exc, MemoryError):
        return StorageError("out of memory. Fix: use smaller frames, phase1.sample_fraction or "
                            "phase1.sharding")
    return None


def user_error(exc: BaseException) -> BaseException:
    """The exception a user should see for ``exc``.

    The first cubeline error in the exception's chain (Prefect and MLflow wrap ours), else a
    translation of a library failure a user can cause (:func:`_foreign`), else ``exc`` itself
    (a bug, :data:`EXIT_INTERNAL`).
    """
    chain = list(_chain(exc))
    for e in chain:
        if isinstance(e, (CubelineError, KeyboardInterrupt)):
            return e
        if "ExternalSignal" in {c.__name__ for c in type(e).__mro__}:  # Prefect's SIGTERM
            return KeyboardInterrupt(str(e))
    for e in chain:
        translated = _foreign(e)
        if translated is not None:
            return translated
    return exc


def one_line(text: str) -> str:
    """``text`` on one line: newlines and runs of blanks become single spaces."""
    return " ".join(str(text).split())


def report(command: str, exc: BaseException, verbose: bool) -> int:
    """Print the one error line of a failed command (the traceback first with ``-v``).

    Args:
        command: The sub-command (``run``, ``predict``...).
        exc: What ended it.
        verbose: ``-v`` was given.

    Returns:
        The exit code.
    """
    err = user_error(exc)
    if verbose:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    code = exit_code(err)
    if isinstance(err, KeyboardInterrupt):
        what = ("interrupted (Ctrl-C or SIGTERM); the run was marked KILLED and its servers "
                "stopped. Fix: run again (Phase 2 resumes from its last checkpoint)")
    elif code == EXIT_INTERNAL:
        what = (f"internal error: {type(err).__name__}: {one_line(str(err))[:300]} "
                f"(at {_where(err) or 'unknown'}). Fix: this is a bug in cubeline; rerun with -v "
                "for the traceback and report it")
    else:
        what = one_line(str(err))
    print(f"cubeline {command}: error: {what}", file=sys.stderr)
    sys.stderr.flush()
    return code


__all__ = [
    "EXIT_CODES",
    "EXIT_INTERNAL",
    "EXIT_INTERRUPTED",
    "ConfigError",
    "ContentHashError",
    "DataValidationError",
    "DegenerateStatisticsError",
    "ExitCode",
    "OrchestrationUnavailableError",
    "StorageError",
    "TrainingError",
    "exit_code",
    "one_line",
    "report",
    "user_error",
]
