"""The team stack: shared PostgreSQL, MLflow server, Prefect server, work pool and DVC remote.

``cubeline stack up`` brings up, on 127.0.0.1 and in one folder (``--dir``, default
``<repo>/.stack``, git-ignored):

- a PostgreSQL cluster of its own (``initdb`` + ``pg_ctl``; run as an unprivileged user:
  ``postgres`` when the command runs as root -- PostgreSQL refuses to run as root -- through
  ``runuser``; the caller otherwise), TCP on 127.0.0.1 only, no Unix socket, SCRAM passwords;
  databases ``mlflow`` and ``prefect``, and a role ``registry_lock`` that may only connect (the
  registry's advisory lock, :mod:`tasks.registry`);
- an MLflow tracking server on the ``mlflow`` database that serves its artifact store
  (``--artifacts-destination <dir>/mlflow-artifacts``: clients upload and download through the
  server, never into the folder);
- a Prefect server on the ``prefect`` database (asyncpg), a ``process`` work pool ``cubeline``
  and two workers polling it;
- a DVC remote folder ``<dir>/dvc-remote`` outside every clone.

Credentials are generated (``secrets.token_urlsafe``) into ``<dir>/stack.json`` and the
environment file ``<dir>/stack.env``, both mode 600; nothing secret is printed. Every server and
worker gets the telemetry switches of :mod:`tasks.env`. ``stack down`` stops the workers, the
servers and PostgreSQL (process groups and their descendants, then ``pg_ctl stop``) and checks
that none is left; the data stay for the next ``up`` (``--purge`` removes the folder).

A clone joins with ``cubeline stack join`` (the DVC remote of ``params.yaml dvc.remote`` is
pointed at the shared folder in the git-ignored ``.dvc/config.local``, the bundled data pushed
there) and registers the work-pool deployments with ``cubeline stack deploy``. Every flow runs
unchanged: ``PREFECT_API_URL``, ``MLFLOW_TRACKING_URI`` and ``CUBELINE_REGISTRY_LOCK_URI`` from
``stack.env`` are all they need.

Why one module of over 900 lines: it is one state machine over one folder (bring up, join, deploy,
take down, check nothing is left) whose steps share the credentials, ports and process groups
recorded in ``stack.json``; split, every part would need that state passed around or re-read.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nodes.errors import ConfigError, CubelineError
from tasks.env import TELEMETRY_ENV, process_alive

__all__ = [
    "LOCK_ENV",
    "POOL",
    "StackError",
    "StackState",
    "deploy_to_pool",
    "join_clone",
    "load_state",
    "stack_down",
    "stack_env",
    "stack_status",
    "stack_up",
]

#: Environment variable naming the PostgreSQL database of the registry's advisory lock.
LOCK_ENV = "CUBELINE_REGISTRY_LOCK_URI"
#: Environment variable naming the stack folder (default ``<repo>/.stack``).
DIR_ENV = "CUBELINE_STACK_DIR"
POOL = "cubeline"
STATE_FILE = "stack.json"
ENV_FILE = "stack.env"
_ADMIN = "cubeline"
_LOCK_ROLE = "registry_lock"
_N_WORKERS = 2


class StackError(CubelineError):
    """The team stack cannot be started, reached or stopped."""


@dataclass
class StackState:
    """What ``stack up`` started, persisted in ``<dir>/stack.json`` (mode 600)."""

    dir: str
    pg_bin: str
    run_as: str | None
    pg_port: int
    mlflow_port: int
    prefect_port: int
    admin_password: str
    lock_password: str
    pids: dict[str, int] = field(default_factory=dict)
    started_at: float = 0.0
    startup_s: float = 0.0

    @property
    def root(self) -> Path:
        """The stack folder."""
        return Path(self.dir)

    def pg_url(self, db: str, driver: str = "postgresql") -> str:
        """Admin connection URL of database ``db`` (contains the password)."""
        return f"{driver}://{_ADMIN}:{self.admin_password}@127.0.0.1:{self.pg_port}/{db}"

    @property
    def lock_url(self) -> str:
        """Connection URL of the registry lock role (may only connect)."""
        return f"postgresql://{_LOCK_ROLE}:{self.lock_password}@127.0.0.1:{self.pg_port}/mlflow"

    @property
    def mlflow_url(self) -> str:
        """The MLflow tracking server."""
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def prefect_api(self) -> str:
        """The Prefect API."""
        return f"http://127.0.0.1:{self.prefect_port}/api"

    @property
    def dvc_remote(self) -> Path:
        """The shared DVC remote folder."""
        return self.root / "dvc-remote"

    @property
    def artifacts(self) -> Path:
        """The MLflow server's artifact store (served by the server)."""
        return self.root / "mlflow-artifacts"


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def default_dir(root: Path) -> Path:
    """``$CUBELINE_STACK_DIR``, else ``<root>/.stack``."""
    env = os.environ.get(DIR_ENV)
    return Path(env).resolve() if env else (Path(root) / ".stack").resolve()


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only (created with mode 600)."""
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def load_state(stack_dir: Path) -> StackState:
    """Read ``<stack_dir>/stack.json``.

    Raises:
        StackError: No stack was ever brought up there.
    """
    path = Path(stack_dir) / STATE_FILE
    if not path.is_file():
        raise StackError(
            f"no team stack in {stack_dir} ({STATE_FILE} missing). Fix: `cubeline stack up "
            f"--dir {stack_dir}`, or name the stack's folder with --dir / ${DIR_ENV}."
        )
    return StackState(**json.loads(path.read_text()))


def _save_state(state: StackState) -> None:
    _write_private(state.root / STATE_FILE, json.dumps(asdict(state), indent=2) + "\n")


def stack_env(state: StackState) -> dict[str, str]:
    """What a cubeline process (user shell, worker) needs to use the stack."""
    return {
        "PREFECT_API_URL": state.prefect_api,
        "MLFLOW_TRACKING_URI": state.mlflow_url,  # for mlflow's own tools
        "CUBELINE_MLFLOW_TRACKING_URI": state.mlflow_url,  # what cubeline reads (tasks.tracking)
        LOCK_ENV: state.lock_url,
        DIR_ENV: str(state.root),
        # MLflow prints "View run ... at <url>" on stdout for every run on a server: cubeline's
        # summary names the run already, and --json output must stay one object.
        "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
        **TELEMETRY_ENV,
    }


def _write_env_file(state: StackState) -> Path:
    lines = [
        "# cubeline team stack: `set -a; . THIS_FILE; set +a` (contains the lock password)",
        *(f"{k}={v}" for k, v in stack_env(state).items()),
    ]
    path = state.root / ENV_FILE
    _write_private(path, "\n".join(lines) + "\n")
    return path


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        # As the servers bind: connections of a previous run in TIME_WAIT do not count.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(url, timeout=timeout) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def find_pg_bin() -> Path:
    """The folder of PostgreSQL's ``initdb`` and ``pg_ctl`` (15 preferred).

    ``$CUBELINE_PG_BIN`` wins; then Debian's ``/usr/lib/postgresql/<major>/bin``; then ``PATH``.

    Raises:
        StackError: None found.
    """
    env = os.environ.get("CUBELINE_PG_BIN")
    candidates = [Path(env)] if env else []
    debian = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: (p.parent.name != "15", p.parent.name),
    )
    candidates += debian
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).parent)
    for c in candidates:
        if (c / "initdb").is_file() and (c / "pg_ctl").is_file():
            return c
    raise StackError(
        "PostgreSQL's initdb/pg_ctl not found (looked in $CUBELINE_PG_BIN, "
        "/usr/lib/postgresql/*/bin, PATH). Fix: install PostgreSQL 15 (Debian: "
        "`apt-get install postgresql-15`) or set CUBELINE_PG_BIN to its bin folder."
    )


def _run_as_user(requested: str | None) -> str | None:
    """The unprivileged user that runs PostgreSQL (None: this process's own user)."""
    if os.geteuid() != 0:
        if requested:
            raise StackError(
                f"--pg-user {requested} needs root; without root PostgreSQL runs as you. "
                "Fix: leave --pg-user out."
            )
        return None
    import pwd

    for name in ([requested] if requested else ["postgres", "nobody"]):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        if shutil.which("runuser") is None:
            raise StackError("running as root needs `runuser` (util-linux) to start PostgreSQL "
                             "as an unprivileged user. Fix: install util-linux or run as a "
                             "normal user.")
        return name
    raise StackError(
        f"no unprivileged user {requested or 'postgres/nobody'} to run PostgreSQL (it refuses "
        "to run as root). Fix: create one (`useradd --system pgstack`) and pass --pg-user."
    )


def _as_user(state: StackState, argv: list[str]) -> list[str]:
    return ["runuser", "-u", state.run_as, "--", *argv] if state.run_as else argv


def _chown(path: Path, user: str | None) -> None:
    if user:
        shutil.chown(path, user=user)


def _pg(state: StackState, tool: str, *args: str, timeout: float = 120) -> str:
    argv = _as_user(state, [str(Path(state.pg_bin) / tool), *args])
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "LC_ALL": "C"})
    if proc.returncode != 0:
        raise StackError(
            f"{tool} {' '.join(args[:2])} failed (exit {proc.returncode}): "
            f"{(proc.stderr or proc.stdout).strip()[-800:]}. Log: {state.root / 'pg' / 'log'}"
        )
    return proc.stdout


def _pg_data(state: StackState) -> Path:
    return state.root / "pg" / "data"


# --------------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------------


def _init_cluster(state: StackState) -> None:
    pg_dir = state.root / "pg"
    pg_dir.mkdir(mode=0o700, exist_ok=True)
    _chown(pg_dir, state.run_as)
    if state.run_as:
        # The unprivileged user must be able to reach its folder: every parent searchable.
        check = subprocess.run(["runuser", "-u", state.run_as, "--", "test", "-x", str(pg_dir)],
                               capture_output=True)
        if check.returncode != 0:
            raise StackError(
                f"user {state.run_as!r} (who runs PostgreSQL) cannot reach {pg_dir}: a parent "
                "folder is not searchable by others. Fix: choose --dir under a searchable "
                "path (e.g. /srv/cubeline-stack or /tmp/...), or `chmod o+x` the parents."
            )
    pwfile = pg_dir / "initdb.pw"
    _write_private(pwfile, state.admin_password + "\n")
    _chown(pwfile, state.run_as)
    try:
        _pg(state, "initdb", "-D", str(_pg_data(state)), "-U", _ADMIN, f"--pwfile={pwfile}",
            "--auth=scram-sha-256", "-E", "UTF8", "--no-locale", "--no-instructions")
    finally:
        pwfile.unlink(missing_ok=True)


def _start_pg(state: StackState) -> None:
    opts = (f"-c listen_addresses=127.0.0.1 -p {state.pg_port} -c unix_socket_directories='' "
            "-c max_connections=200")
    _pg(state, "pg_ctl", "-D", str(_pg_data(state)), "-l", str(state.root / "pg" / "log"),
        "-w", "-t", "60", "-o", opts, "start")


def _pg_running(state: StackState) -> bool:
    if not (_pg_data(state) / "PG_VERSION").exists():
        return False
    argv = _as_user(state, [str(Path(state.pg_bin) / "pg_ctl"), "-D", str(_pg_data(state)),
                            "status"])
    return subprocess.run(argv, capture_output=True).returncode == 0


def _create_databases(state: StackState) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(state.pg_url("postgres"), connect_timeout=10, autocommit=True) as conn:
        for db in ("mlflow", "prefect"):
            found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,))
            if found.fetchone() is None:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s",
                              (_LOCK_ROLE,)).fetchone()
        # Advisory locks need no privilege: this role can connect and lock, nothing else.
        # (DDL takes no bind parameters: the generated password is quoted as a literal.)
        conn.execute(
            sql.SQL("{} ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD {}").format(
                sql.SQL("ALTER" if exists else "CREATE"), sql.Identifier(_LOCK_ROLE),
                sql.Literal(state.lock_password),
            )
        )


# --------------------------------------------------------------------------------------------
# Servers and workers
# --------------------------------------------------------------------------------------------


def _base_env(state: StackState) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(TELEMETRY_ENV)
    env["GIT_PYTHON_REFRESH"] = "quiet"
    env["PYTHONWARNINGS"] = "ignore::DeprecationWarning,ignore::FutureWarning"
    env["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    return env


def _spawn(state: StackState, name: str, argv: list[str], env: Mapping[str, str]) -> int:
    logs = state.root / "logs"
    logs.mkdir(exist_ok=True)
    with (logs / f"{name}.log").open("ab") as log:
        proc = subprocess.Popen(argv, env=dict(env), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=state.root,
                                start_new_session=True)
    state.pids[name] = proc.pid
    _save_state(state)
    return proc.pid


def _start_mlflow(state: StackState) -> None:
    env = _base_env(state)
    # The store URI goes through the environment: a password on a command line is public.
    env["MLFLOW_BACKEND_STORE_URI"] = state.pg_url("mlflow")
    # MLflow 3's job runner (huey consumers for GenAI jobs: 3 more processes, 12 threads) has
    # nothing to do for cubeline; on 2 cores it only takes CPU from the runs.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    state.artifacts.mkdir(exist_ok=True)
    _spawn(state, "mlflow", [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
        "--port", str(state.mlflow_port), "--workers", "2", "--serve-artifacts",
        "--artifacts-destination", state.artifacts.as_uri(),
    ], env)


def _prefect_env(state: StackState) -> dict[str, str]:
    env = _base_env(state)
    env["PREFECT_HOME"] = str(state.root / "prefect-home")
    env["PREFECT_API_URL"] = state.prefect_api
    return env


def _start_prefect(state: StackState, scheduler_loop_s: float) -> None:
    env = _prefect_env(state)
    env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = state.pg_url("prefect", "postgresql+asyncpg")
    env["PREFECT_SERVER_API_HOST"] = "127.0.0.1"
    env["PREFECT_SERVER_API_PORT"] = str(state.prefect_port)
    env["PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS"] = str(scheduler_loop_s)
    _spawn(state, "prefect", [
        sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
        "--port", str(state.prefect_port),
    ], env)


def _worker_env(state: StackState) -> dict[str, str]:
    env = _prefect_env(state)
    env.update(stack_env(state))
    return env


def _start_workers(state: StackState) -> None:
    env = _worker_env(state)
    subprocess.run(
        [sys.executable, "-m", "prefect", "work-pool", "create", POOL, "--type", "process"],
        env=env, capture_output=True, text=True, timeout=120, cwd=state.root,
    )  # "already exists" on a restart is fine; the workers below fail loudly otherwise
    for i in range(1, _N_WORKERS + 1):
        _spawn(state, f"worker-{i}", [
            sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL,
            "--type", "process", "--name", f"{POOL}-worker-{i}", "--limit", "1",
        ], env)


def _wait(state: StackState, name: str, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pid = state.pids[name]
    while time.monotonic() < deadline:
        if not process_alive(pid):
            raise StackError(f"{name} server exited during start-up. Log: "
                             f"{state.root / 'logs' / (name + '.log')}")
        if _http_ok(url):
            return
        time.sleep(0.5)
    raise StackError(f"{name} server not healthy at {url} after {timeout:.0f} s. Log: "
                     f"{state.root / 'logs' / (name + '.log')}")


def _wait_workers(state: StackState, timeout: float) -> None:
    """Until both workers have polled the pool (the API lists them)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    deadline = time.monotonic() + timeout
    with (
        temporary_settings({PREFECT_API_URL: state.prefect_api}),
        get_client(sync_client=True) as client,
    ):
        while time.monotonic() < deadline:
            for i in range(1, _N_WORKERS + 1):
                if not process_alive(state.pids[f"worker-{i}"]):
                    raise StackError(f"worker-{i} exited during start-up. Log: "
                                     f"{state.root / 'logs' / f'worker-{i}.log'}")
            with contextlib.suppress(Exception):
                workers = client.read_workers_for_work_pool(POOL)
                if len({w.name for w in workers}) >= _N_WORKERS:
                    return
            time.sleep(1.0)
    raise StackError(f"the {_N_WORKERS} workers did not reach pool {POOL!r} within "
                     f"{timeout:.0f} s. Logs: {state.root / 'logs'}")


# --------------------------------------------------------------------------------------------
# up / down / status
# --------------------------------------------------------------------------------------------


def stack_up(
    stack_dir: Path,
    *,
    pg_port: int = 15432,
    mlflow_port: int = 5000,
    prefect_port: int = 4200,
    pg_user: str | None = None,
    scheduler_loop_s: float = 60.0,
    timeout_s: float = 300.0,
) -> StackState:
    """Bring the team stack up in ``stack_dir`` (created), or restart a stopped one there.

    Args:
        stack_dir: The stack's folder (PostgreSQL data, artifacts, DVC remote, logs, secrets).
        pg_port: PostgreSQL's port on 127.0.0.1 (a new stack only; a restart keeps its ports).
        mlflow_port: The MLflow server's port.
        prefect_port: The Prefect server's port.
        pg_user: Unprivileged user that runs PostgreSQL when this runs as root.
        scheduler_loop_s: How often Prefect's scheduler creates runs of schedules.
        timeout_s: Start-up limit of each server.

    Returns:
        The stack's state (URLs, pids, start-up time).

    Raises:
        StackError: A port is taken, PostgreSQL is missing, or a service fails to start (the
            message names its log). Whatever was started is stopped again.
    """
    t0 = time.monotonic()
    stack_dir = Path(stack_dir).resolve()
    if (stack_dir / STATE_FILE).is_file():
        state = load_state(stack_dir)
        running = [n for n, pid in state.pids.items() if process_alive(pid)]
        if running or _pg_running(state):
            raise StackError(
                f"the stack in {stack_dir} is already (partly) up: {running or ['postgresql']}."
                f" Fix: `cubeline stack status --dir {stack_dir}`, or `cubeline stack down "
                f"--dir {stack_dir}` first."
            )
        state.pids = {}
    else:
        run_as = _run_as_user(pg_user)
        stack_dir.mkdir(parents=True, exist_ok=True)
        # Others may traverse (PostgreSQL's user reaches pg/), not list; secrets are mode 600.
        stack_dir.chmod(0o711)
        state = StackState(
            dir=str(stack_dir), pg_bin=str(find_pg_bin()), run_as=run_as, pg_port=pg_port,
            mlflow_port=mlflow_port, prefect_port=prefect_port,
            admin_password=secrets.token_urlsafe(24), lock_password=secrets.token_urlsafe(24),
        )
    taken = [f"{what} {p}" for what, p in (("PostgreSQL", state.pg_port),
                                           ("MLflow", state.mlflow_port),
                                           ("Prefect", state.prefect_port))
             if not _port_free(p)]
    if taken:
        raise StackError(
            f"port(s) taken on 127.0.0.1: {', '.join(taken)}. Fix: stop what listens there, or "
            "choose others (--pg-port / --mlflow-port / --prefect-port; a new --dir for an "
            "existing stack)."
        )
    try:
        _save_state(state)
        state.dvc_remote.mkdir(exist_ok=True)
        if not (_pg_data(state) / "PG_VERSION").exists():
            _init_cluster(state)
        _start_pg(state)
        _create_databases(state)
        _start_mlflow(state)
        _start_prefect(state, scheduler_loop_s)
        _wait(state, "mlflow", f"{state.mlflow_url}/health", timeout_s)
        _wait(state, "prefect", f"{state.prefect_api}/health", timeout_s)
        _start_workers(state)
        _wait_workers(state, timeout_s)
    except BaseException:
        with contextlib.suppress(Exception):
            stack_down(stack_dir)
        raise
    state.started_at = time.time()
    state.startup_s = round(time.monotonic() - t0, 2)
    _save_state(state)
    _write_env_file(state)
    return state


def _descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def _stop_pids(pids: list[int], timeout: float) -> list[int]:
    """SIGTERM each process group, then SIGKILL what is left; returns the survivors."""
    everyone = list(dict.fromkeys(p for pid in pids for p in (pid, *_descendants(pid))))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in everyone:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, sig)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(process_alive(p) for p in everyone):
            time.sleep(0.2)
        for pid in everyone:  # reap our own children (a test's Popen parent)
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)
        if not any(process_alive(p) for p in everyone):
            return []
    return [p for p in everyone if process_alive(p)]


def stack_down(stack_dir: Path, purge: bool = False) -> list[str]:
    """Stop the workers, the servers and PostgreSQL of the stack in ``stack_dir``.

    Args:
        stack_dir: The stack's folder.
        purge: Also delete the folder (databases, artifacts, DVC remote, secrets).

    Returns:
        What was stopped.

    Raises:
        StackError: A process survived SIGKILL, or PostgreSQL did not stop.
    """
    state = load_state(Path(stack_dir).resolve())
    stopped: list[str] = []
    order = [n for n in state.pids if n.startswith("worker-")] + ["prefect", "mlflow"]
    for name in order:
        pid = state.pids.get(name)
        if pid is None:
            continue
        left = _stop_pids([pid], timeout=20 if name.startswith("worker") else 30)
        if left:
            raise StackError(f"{name}: processes {left} survived SIGKILL")
        stopped.append(name)
    state.pids = {}
    _save_state(state)
    if _pg_running(state):
        _pg(state, "pg_ctl", "-D", str(_pg_data(state)), "-w", "-t", "60", "-m", "fast", "stop")
        stopped.append("postgresql")
    if purge:
        shutil.rmtree(state.root)
    return stopped


def stack_status(stack_dir: Path) -> dict[str, Any]:
    """Each service of the stack: up or down, and where.

    Returns:
        ``{"services": {name: {"up": bool, "url"/"pid": ...}}, "up": all up, ...}``.
    """
    state = load_state(Path(stack_dir).resolve())
    services: dict[str, dict[str, Any]] = {
        "postgresql": {"up": _pg_running(state), "address": f"127.0.0.1:{state.pg_port}",
                       "run_as": state.run_as or "(this user)"},
        "mlflow": {"up": _http_ok(f"{state.mlflow_url}/health"), "url": state.mlflow_url,
                   "pid": state.pids.get("mlflow")},
        "prefect": {"up": _http_ok(f"{state.prefect_api}/health"),
                    "url": state.prefect_api.removesuffix("/api"),
                    "pid": state.pids.get("prefect")},
    }
    for i in range(1, _N_WORKERS + 1):
        pid = state.pids.get(f"worker-{i}")
        services[f"worker-{i}"] = {"up": pid is not None and process_alive(pid), "pid": pid,
                                   "pool": POOL}
    return {
        "dir": str(state.root),
        "up": all(s["up"] for s in services.values()),
        "services": services,
        "dvc_remote": str(state.dvc_remote),
        "artifacts": str(state.artifacts),
        "env_file": str(state.root / ENV_FILE),
        "startup_s": state.startup_s,
    }


def describe(state: StackState) -> str:
    """The lines ``stack up`` prints: URLs, folders, the environment to export (no secrets)."""
    env_file = state.root / ENV_FILE
    return "\n".join([
        f"team stack up in {state.startup_s:.1f} s ({state.root})",
        f"  PostgreSQL  127.0.0.1:{state.pg_port} (databases mlflow, prefect; runs as "
        f"{state.run_as or 'this user'})",
        f"  MLflow      {state.mlflow_url}  (artifacts served from {state.artifacts})",
        f"  Prefect     {state.prefect_api.removesuffix('/api')}  (work pool {POOL!r}, "
        f"{_N_WORKERS} workers)",
        f"  DVC remote  {state.dvc_remote}",
        f"  secrets     {state.root / STATE_FILE}, {env_file} (mode 600)",
        "export the environment (in every shell that runs cubeline):",
        f"  set -a; . {env_file}; set +a",
        f"  # PREFECT_API_URL={state.prefect_api} MLFLOW_TRACKING_URI={state.mlflow_url}",
        f"  # {LOCK_ENV}=postgresql://{_LOCK_ROLE}:***@127.0.0.1:{state.pg_port}/mlflow",
        "then in each clone: cubeline stack join; cubeline stack deploy (once per team)",
    ])


# --------------------------------------------------------------------------------------------
# A clone joins; deployments on the work pool
# --------------------------------------------------------------------------------------------


def _dvc(root: Path, *args: str, timeout: float = 600) -> str:
    exe = Path(sys.executable).parent / "dvc"
    argv = [str(exe) if exe.exists() else "dvc", *args]
    proc = subprocess.run(argv, cwd=root, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **TELEMETRY_ENV})
    if proc.returncode != 0:
        raise StackError(f"dvc {' '.join(args)} failed in {root}: "
                         f"{(proc.stderr or proc.stdout).strip()[-600:]}")
    return proc.stdout


def join_clone(root: Path, stack_dir: Path) -> dict[str, Any]:
    """Point the clone at ``root`` to the stack's DVC remote and push the bundled data there.

    The remote named by ``params.yaml`` ``dvc.remote`` gets the shared folder as its URL in the
    git-ignored ``.dvc/config.local``: params.yaml and ``.dvc/config`` stay as committed, so
    the clone's runs are comparable with everyone's (same params hash).

    Returns:
        ``{"remote": name, "url": folder, "pushed": dvc's summary}``.
    """
    from tasks.params import load_params

    state = load_state(stack_dir)
    root = Path(root).resolve()
    remote = load_params(root / "params.yaml").dvc.remote or _dvc(root, "remote", "default")
    remote = remote.strip()
    local_cfg = root / ".dvc" / "config.local"
    already = local_cfg.is_file() and str(state.dvc_remote) in local_cfg.read_text()
    if not already:
        # The bundled data from the remote the clone came with, before it is redirected.
        _dvc(root, "pull", "-q", "-r", remote)
        _dvc(root, "remote", "modify", "--local", remote, "url", str(state.dvc_remote))
    pushed = _dvc(root, "push", "-r", remote).strip().splitlines()
    return {"remote": remote, "url": str(state.dvc_remote),
            "pushed": pushed[-1] if pushed else ""}


def copy_dvc_objects(root: Path, state: StackState) -> tuple[Path | None, int]:
    """Copy the objects of the clone's own (committed) DVC remote into the stack's remote.

    A single-user store's runs name data versions and Phase-1 states by DVC hash; after a
    migration they must be restorable from the shared remote. Only a folder remote is copied
    (an S3 remote is shared already); objects present on both sides are left alone.

    Returns:
        The source folder (None: not a local folder) and the number of files copied.
    """
    from tasks.params import load_params

    remote = load_params(root / "params.yaml").dvc.remote or _dvc(root, "remote", "default")
    url = _dvc(root, "config", "--project", f"remote.{remote.strip()}.url").strip()
    if "://" in url and not url.startswith("file://"):
        return None, 0
    src = Path(url.removeprefix("file://"))
    if not src.is_absolute():
        src = (root / ".dvc" / src).resolve()
    if not src.is_dir() or src.resolve() == state.dvc_remote.resolve():
        return None, 0
    copied = 0
    for path in src.rglob("*"):
        if path.is_file():
            dst = state.dvc_remote / path.relative_to(src)
            if not dst.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, dst)
                copied += 1
    return src, copied


def deploy_to_pool(
    params_path: Path, pool: str = POOL, cron: str | None = None
) -> list[str]:
    """Register ``retrain`` (cron + drift trigger) and ``drift_watch`` on the work pool.

    The runs execute on the pool's workers in the clone of ``params_path`` (its working
    directory and its code), with the step cache where ``cubeline run`` keeps it.

    Args:
        params_path: The clone's ``params.yaml``.
        pool: Work pool name.
        cron: Overrides ``schedule.retrain_cron`` (e.g. a test's next minute).

    Returns:
        The deployments' names (``flow/deployment``).

    Raises:
        ConfigError: No Prefect server configured or reachable.
    """
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger
    from prefect.schedules import Cron, Interval, Schedule

    from flows import results_dir
    from flows.deploy import RETRAIN_DEPLOYMENT, WATCH_DEPLOYMENT, check_server
    from flows.drift_watch import drift_watch
    from flows.retrain import retrain
    from tasks.params import load_params
    from tasks.steps import DRIFT_EVENT

    check_server()
    params_path = Path(params_path).resolve()
    root = params_path.parent
    sched = load_params(params_path).schedule
    common: dict[str, Any] = {"params_path": str(params_path)}
    job_variables = {
        "working_dir": str(root),
        "env": {"PYTHONPATH": str(root),
                "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(results_dir(root))},
    }
    on_drift = DeploymentEventTrigger(
        name="retrain-on-drift",
        description="drift_watch found drift: re-initialize and retrain",
        expect={DRIFT_EVENT},
        match={"prefect.resource.id": "cubeline.data.*"},
        parameters={**common, "data_version": "{{ event.payload.data_version }}",
                    "event_id": "{{ event.id | string }}"},
    )
    names = []
    plan: list[tuple[Any, str, str, Schedule, list[Any]]] = [
        (retrain, "flows/retrain.py:retrain", RETRAIN_DEPLOYMENT,
         Cron(cron or sched.retrain_cron, timezone=sched.timezone), [on_drift]),
        (drift_watch, "flows/drift_watch.py:drift_watch", WATCH_DEPLOYMENT,
         Interval(sched.drift_watch_interval_s), []),
    ]
    for flow_obj, entry, name, schedule, triggers in plan:
        remote = flow_obj.from_source(source=str(root), entrypoint=entry)
        remote.deploy(
            name=name, work_pool_name=pool, parameters=common, schedules=[schedule],
            triggers=triggers, job_variables=job_variables, tags=["cubeline"], build=False,
            push=False, print_next_steps=False, ignore_warnings=True,
        )
        names.append(f"{flow_obj.name}/{name}")
    return names


@contextlib.contextmanager
def running_stack(stack_dir: Path, **kwargs: Any) -> Iterator[StackState]:
    """``stack up`` for the duration of a ``with`` block, ``stack down`` after (tests, bench)."""
    try:
        state = stack_up(stack_dir, **kwargs)
        yield state
    finally:
        if (Path(stack_dir) / STATE_FILE).is_file():
            stack_down(stack_dir)


def check_dir_arg(value: str | None, root: Path) -> Path:
    """The stack folder from ``--dir`` or the default; refuses a file."""
    path = Path(value).resolve() if value else default_dir(root)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--dir {path} is a file. Fix: name a folder for the stack.")
    return path


# --------------------------------------------------------------------------------------------
# ``cubeline stack ...``
# --------------------------------------------------------------------------------------------


def add_parser(sub: Any) -> None:
    """Add ``stack up|down|status|join|deploy|migrate`` to the ``cubeline`` parser."""
    p = sub.add_parser("stack", help="the team stack: shared PostgreSQL, MLflow, Prefect, DVC",
                       description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.set_defaults(func=cmd_stack)
    acts = p.add_subparsers(dest="action", required=True)

    def with_dir(q: Any) -> Any:
        q.add_argument("--dir", help=f"the stack's folder (default: ${DIR_ENV}, else "
                       "<repo>/.stack)")
        return q

    q = with_dir(acts.add_parser("up", help="start the stack (or restart a stopped one)"))
    q.add_argument("--pg-port", type=int, default=15432)
    q.add_argument("--mlflow-port", type=int, default=5000)
    q.add_argument("--prefect-port", type=int, default=4200)
    q.add_argument("--pg-user", help="unprivileged user for PostgreSQL when run as root "
                   "(default: postgres, else nobody)")
    q.add_argument("--scheduler-loop-s", type=float, default=60.0,
                   help="how often Prefect's scheduler creates scheduled runs")
    q.add_argument("--json", action="store_true")
    q = with_dir(acts.add_parser("down", help="stop every process of the stack"))
    q.add_argument("--purge", action="store_true", help="also delete the folder and its data")
    q = with_dir(acts.add_parser("status", help="which services are up (exit 1 if any is not)"))
    q.add_argument("--json", action="store_true")
    with_dir(acts.add_parser("join", help="point this clone's DVC remote at the stack's and "
                             "push the bundled data there"))
    q = with_dir(acts.add_parser("deploy", help="register retrain (cron + drift trigger) and "
                                 "drift_watch on the work pool, running in this clone"))
    q.add_argument("--cron", help="override schedule.retrain_cron")
    q.add_argument("--pool", default=POOL)
    q = with_dir(acts.add_parser("migrate", help="move a single-user mlflow.db + mlartifacts/ "
                                 "onto the stack (runs, models, aliases, champion history)"))
    q.add_argument("--from", dest="source", help="SQLite store (default: <repo>/mlflow.db)")
    q.add_argument("--artifacts", help="its artifact folder (default: <repo>/mlartifacts)")
    q.add_argument("--no-artifacts", action="store_true", help="the store has no artifacts")
    # The objects of the clone's committed DVC remote (a folder) are copied to the stack's too.
    q.add_argument("--json", action="store_true")


def _use_stack_env(state: StackState) -> None:
    """This process talks to the stack (its variables win over the caller's)."""
    os.environ.update(stack_env(state))


def cmd_stack(args: Any) -> int:
    """``cubeline stack ACTION``."""
    from tasks.env import repo_root

    params = Path(args.params).resolve() if args.params else repo_root() / "params.yaml"
    root = params if params.is_dir() else params.parent
    stack_dir = check_dir_arg(args.dir, root)
    if args.action == "up":
        state = stack_up(stack_dir, pg_port=args.pg_port, mlflow_port=args.mlflow_port,
                         prefect_port=args.prefect_port, pg_user=args.pg_user,
                         scheduler_loop_s=args.scheduler_loop_s)
        if args.json:
            print(json.dumps(stack_status(stack_dir)))
        else:
            print(describe(state))
        return 0
    if args.action == "down":
        stopped = stack_down(stack_dir, purge=args.purge)
        print(f"stopped: {', '.join(stopped) or 'nothing was running'}"
              + (f"; removed {stack_dir}" if args.purge else f"; data kept in {stack_dir}"))
        return 0
    if args.action == "status":
        status = stack_status(stack_dir)
        if args.json:
            print(json.dumps(status))
        else:
            print(f"team stack in {status['dir']}: {'up' if status['up'] else 'NOT all up'}")
            for name, s in status["services"].items():
                where = s.get("url") or s.get("address") or f"pid {s.get('pid')}"
                print(f"  {name:<11} {'up  ' if s['up'] else 'DOWN'} {where}")
            print(f"  env: set -a; . {status['env_file']}; set +a")
        return 0 if status["up"] else 1
    state = load_state(stack_dir)
    _use_stack_env(state)
    if args.action == "join":
        out = join_clone(root, stack_dir)
        print(f"DVC remote {out['remote']!r} of {root} -> {out['url']} (.dvc/config.local); "
              f"{out['pushed']}")
        return 0
    if args.action == "deploy":
        names = deploy_to_pool(root / "params.yaml", pool=args.pool, cron=args.cron)
        print(f"deployed on work pool {args.pool!r} from {root}: {', '.join(names)}")
        return 0
    if args.action == "migrate":
        from tasks.migrate import migrate_store

        artifacts = None if args.no_artifacts else Path(args.artifacts or root / "mlartifacts")
        out = migrate_store(Path(args.source or root / "mlflow.db"), artifacts,
                            state.pg_url("mlflow", "postgresql+psycopg"), state.mlflow_url)
        # The runs name data versions and Phase-1 states by hash: their objects move too.
        dvc_src, out["dvc_objects_copied"] = copy_dvc_objects(root, state)
        out["dvc_remote_from"] = str(dvc_src) if dvc_src else None
        if args.json:
            print(json.dumps(out))
        else:
            s = out["summary"]
            print(f"migrated in {out['seconds']:.1f} s to {state.mlflow_url}: {s['runs']} runs, "
                  f"{sum(out['rows'].values())} rows, {out['files_uploaded']} artifact files, "
                  f"{out['dvc_objects_copied']} DVC objects from {out['dvc_remote_from']}")
            for name, m in s["models"].items():
                print(f"  {name}: versions {m['versions']}, aliases {m['aliases']}, "
                      f"{len(m['history'])} history entries")
        return 0
    raise ConfigError(f"unknown stack action {args.action!r}")
