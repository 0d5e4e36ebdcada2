"""The registry lock: one writer at a time, on one machine or across machines.

With ``$CUBELINE_REGISTRY_LOCK_URI`` (the team stack's ``stack.env``) or a ``postgresql``
registry, it is PostgreSQL's session advisory lock on that database: held by the database
server, so it spans machines, and dropped when its holder dies or its connection breaks.
Otherwise it is a file lock keyed on the registry URI (:func:`tasks.tracking.uri_lock`), which is
host-local: fine for the embedded SQLite store. Either way a kill leaves no stale lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass
from tasks.registry.base import RegistryError

log = logging.getLogger(__name__)


#: PostgreSQL URL of the registry's cross-machine lock (``cubeline stack up`` exports it).
LOCK_ENV = "CUBELINE_REGISTRY_LOCK_URI"


#: The advisory-lock key: one per database (one registry per team stack), the same for every
#: client whatever host name it uses to reach the server.
_ADVISORY_KEY = int.from_bytes(
    hashlib.sha256(b"cubeline.registry").digest()[:8], "big", signed=True
)


_held = threading.local()


_warned_host_local = False


def _lock_database() -> str | None:
    """The PostgreSQL database whose advisory lock serializes registry moves, if any.

    ``$CUBELINE_REGISTRY_LOCK_URI`` wins (the clients of a tracking *server* reach its database
    only through it); else the registry URI itself when it is a ``postgresql`` store.
    """
    import mlflow

    env = os.environ.get(LOCK_ENV)
    if env:
        return env
    uri = mlflow.get_registry_uri() or ""
    if uri.startswith("postgresql"):
        return uri
    return None


def _redact(url: str) -> str:
    """``url`` without its password (for messages)."""
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _try_lock(conn: Any) -> bool:
    row = conn.execute("SELECT pg_try_advisory_lock(%s)", (_ADVISORY_KEY,)).fetchone()
    return bool(row and row[0])


@contextlib.contextmanager
def _advisory_lock(url: str, timeout_s: float) -> Iterator[None]:
    """Hold PostgreSQL's session advisory lock ``_ADVISORY_KEY`` on the database at ``url``.

    The lock lives in the database server, so it excludes registrations on every machine; it is
    bound to this connection, so the server drops it when the holder dies or its connection
    breaks (a killed run leaves no stale lock). Re-entrant within a thread, like the file lock:
    a rollback hook may take the lock its registration holds.
    """
    held: dict[str, Any] = getattr(_held, "locks", None) or {}
    _held.locks = held
    if url in held:
        held[url][1] += 1
        try:
            yield
        finally:
            held[url][1] -= 1
        return
    import psycopg

    # libpq's form: the SQLAlchemy driver suffix (postgresql+psycopg://) is not a URL scheme.
    dsn = "postgresql://" + url.split("://", 1)[1] if url.startswith("postgresql+") else url
    try:
        conn = psycopg.connect(
            dsn, autocommit=True, connect_timeout=10, keepalives=1, keepalives_idle=30,
            application_name=f"cubeline registry lock pid {os.getpid()}",
        )
    except psycopg.Error as exc:
        raise RegistryError(
            f"The registry lock database {_redact(url)} (${LOCK_ENV}) does not answer: "
            f"{str(exc).strip()}. Fix: start the team stack (`cubeline stack up`, then export "
            "its stack.env), or unset the variable to use the host-local file lock."
        ) from exc
    try:
        deadline = time.monotonic() + timeout_s
        wait = 0.05
        while not _try_lock(conn):
            if time.monotonic() >= deadline:
                row = conn.execute(
                    "SELECT a.application_name, a.client_addr FROM pg_locks l JOIN "
                    "pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND "
                    "l.granted AND a.pid <> pg_backend_pid() LIMIT 1"
                ).fetchone()
                holder = f"{row[0]} from {row[1] or 'this host'}" if row else "another client"
                raise RegistryError(
                    f"Another registration ({holder}) has held the registry lock (PostgreSQL "
                    f"advisory lock on {_redact(url)}) for over {timeout_s:.0f} s. Fix: wait "
                    "for the other cubeline run to finish; the lock frees itself when that "
                    "process exits or its connection drops."
                )
            time.sleep(wait)
            wait = min(wait * 2, 1.0)
        held[url] = [conn, 1]
        try:
            yield
        finally:
            del held[url]
            with contextlib.suppress(psycopg.Error):
                conn.execute("SELECT pg_advisory_unlock(%s)", (_ADVISORY_KEY,))
    finally:
        conn.close()


@contextlib.contextmanager
def _registry_lock(timeout_s: float) -> Iterator[None]:
    """Serialize the registry's read -> decide -> write sequences.

    Across machines where the services give a lock: PostgreSQL's advisory lock on the database
    of :func:`_lock_database` (the team stack's). Otherwise an ``fcntl`` file lock keyed on the
    registry URI, which spans the processes of one host only (the embedded SQLite default).
    """
    import mlflow

    from tasks.tracking import LockTimeoutError, uri_lock

    database = _lock_database()
    if database is not None:
        with _advisory_lock(database, timeout_s):
            yield
        return
    uri = mlflow.get_registry_uri()
    global _warned_host_local
    if uri.startswith(("http://", "https://")) and not _warned_host_local:
        _warned_host_local = True
        log.warning(
            "Registry %s is remote but $%s is unset: registrations are serialized on this host "
            "only. Set it to the PostgreSQL database of the tracking server (cubeline stack "
            "up's stack.env does) to serialize them across machines.", uri, LOCK_ENV,
        )
    try:
        with uri_lock(uri, "registry", timeout_s):
            yield
    except LockTimeoutError as exc:
        raise RegistryError(
            f"Another registration has held the registry lock {exc.path} for over "
            f"{timeout_s:.0f} s. Fix: wait for the other cubeline run to finish; the lock frees "
            "itself when that process exits."
        ) from exc
