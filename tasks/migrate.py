"""Move a single-user MLflow store (``mlflow.db`` + ``mlartifacts/``) onto a team's server.

The rows are copied table by table, with their ids, from the SQLite file into the PostgreSQL
database of the tracking server: runs with params, metrics (whole histories), tags and inputs,
logged models, registered models with their versions, tags and aliases. Copying rows rather than
replaying API calls keeps everything that identifies a thing: run ids (the champion-history run
is found through a registered-model tag that names it), version numbers, alias targets,
timestamps. Both stores must be at the same MLflow schema revision (the same MLflow version), and
the target must hold no runs and no registered models yet (what was there is never merged).

Artifact locations under the source's artifact folder (``file:///.../mlartifacts/...``) become
``mlflow-artifacts:/<prefix>/...`` -- served by the tracking server -- and the folder's files are
uploaded through the server (its ``mlflow-artifacts`` API), never written into its store
directly. The result is then read back through the server and compared with the source: run,
model, version and alias counts, each model's champion history, and the champion's artifacts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from nodes.errors import CubelineError

__all__ = ["MigrationError", "migrate_store", "store_summary"]

_BATCH = 1000


class MigrationError(CubelineError):
    """The source store cannot be moved onto the target (missing, other schema, not empty)."""


def _engine(url: str) -> Any:
    import sqlalchemy

    return sqlalchemy.create_engine(url)


def _revision(conn: Any) -> str | None:
    import sqlalchemy

    try:
        row = conn.execute(sqlalchemy.text("SELECT version_num FROM alembic_version")).first()
    except sqlalchemy.exc.SQLAlchemyError:
        return None
    return None if row is None else str(row[0])


def _count(conn: Any, table: str) -> int:
    import sqlalchemy

    return int(conn.execute(sqlalchemy.text(f"SELECT count(*) FROM {table}")).scalar_one())


def store_summary(tracking_uri: str) -> dict[str, Any]:
    """What a migration must keep, read through MLflow's client at ``tracking_uri``.

    Returns:
        ``{"runs": n, "models": {name: {"versions": [...], "aliases": {...},
        "history": [HistoryEntry as a dict, ...]}}}``.
    """
    import mlflow

    from tasks.registry import champion_history

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    client = mlflow.MlflowClient()
    from mlflow.entities import ViewType

    experiments = client.search_experiments(view_type=ViewType.ALL)
    runs = 0
    for exp in experiments:
        token = None
        while True:
            page = client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL,
                                      max_results=1000, page_token=token)
            runs += len(page)
            token = page.token
            if not token:
                break
    models: dict[str, Any] = {}
    for rm in client.search_registered_models():
        versions = sorted(int(v.version) for v in client.search_model_versions(
            f"name='{rm.name}'"))
        models[rm.name] = {
            "versions": versions,
            "aliases": dict(sorted((k, str(v)) for k, v in rm.aliases.items())),
            "history": [asdict(h) for h in champion_history(rm.name)],
        }
    return {"runs": runs, "models": models}


def _rewriter(artifacts_dir: Path, prefix: str) -> tuple[Callable[[Any], Any], list[int]]:
    roots = [artifacts_dir.as_uri(), str(artifacts_dir)]
    target = f"mlflow-artifacts:/{prefix.strip('/')}"
    hits = [0]

    def rewrite(value: Any) -> Any:
        if isinstance(value, str):
            for root in roots:
                if value == root or value.startswith(root + "/"):
                    hits[0] += 1
                    return target + value[len(root):]
        return value

    return rewrite, hits


def _copy_rows(src: Any, dst: Any, rewrite: Callable[[Any], Any]) -> dict[str, int]:
    import sqlalchemy
    from sqlalchemy.dialects.postgresql import insert

    src_md = sqlalchemy.MetaData()
    src_md.reflect(src)
    dst_md = sqlalchemy.MetaData()
    dst_md.reflect(dst)
    copied: dict[str, int] = {}
    with src.connect() as s, dst.begin() as d:
        for table in dst_md.sorted_tables:
            if table.name == "alembic_version" or table.name not in src_md.tables:
                continue
            src_table = src_md.tables[table.name]
            cols = [c.name for c in table.columns if c.name in src_table.columns]
            n = 0
            result = s.execute(sqlalchemy.select(*(src_table.c[c] for c in cols)))
            while batch := result.fetchmany(_BATCH):
                rows = [{c: rewrite(v) for c, v in zip(cols, row, strict=True)} for row in batch]
                # What the server created at start (experiment 0, "Default") is kept as it is.
                stmt = insert(table).values(rows).on_conflict_do_nothing()
                d.execute(stmt)
                n += len(rows)
            if n:
                copied[table.name] = n
            # Rows came with their ids: move serial/identity sequences past them.
            for col in table.primary_key.columns:
                seq = d.execute(sqlalchemy.text("SELECT pg_get_serial_sequence(:t, :c)"),
                                {"t": table.name, "c": col.name}).scalar()
                if seq:
                    d.execute(sqlalchemy.text(
                        f'SELECT setval(:s, GREATEST((SELECT max("{col.name}") FROM '
                        f'"{table.name}"), 1))'), {"s": seq})
    return copied


def migrate_store(
    source_db: Path,
    artifacts_dir: Path | None,
    target_db_url: str,
    tracking_uri: str,
    prefix: str = "migrated",
) -> dict[str, Any]:
    """Copy ``source_db`` and its artifacts onto the tracking server at ``tracking_uri``.

    Args:
        source_db: The single-user SQLite store (``mlflow.db``).
        artifacts_dir: Its artifact folder (``mlartifacts/``); None: no artifacts to move.
        target_db_url: SQLAlchemy URL of the server's PostgreSQL database.
        tracking_uri: The tracking server (``http://...``), which serves the artifact store.
        prefix: Folder of the server's artifact store that receives the artifacts.

    Returns:
        Rows copied per table, locations rewritten, files uploaded, seconds, and the summary
        (runs, versions, aliases, history) read back through the server.

    Raises:
        MigrationError: Source missing or at another schema revision, target not empty, or the
            copy read back differs from the source.
    """
    t0 = time.monotonic()
    source_db = Path(source_db).resolve()
    if not source_db.is_file():
        raise MigrationError(f"no MLflow store at {source_db}. Fix: pass --from <mlflow.db>.")
    if artifacts_dir is not None:
        artifacts_dir = Path(artifacts_dir).resolve()
        if not artifacts_dir.is_dir():
            raise MigrationError(f"no artifact folder {artifacts_dir}. Fix: pass --artifacts "
                                 "<mlartifacts>, or --no-artifacts when there are none.")
    src = _engine(f"sqlite:///{source_db}")
    dst = _engine(target_db_url)
    try:
        with src.connect() as s, dst.connect() as d:
            src_rev, dst_rev = _revision(s), _revision(d)
            if src_rev is None:
                raise MigrationError(f"{source_db} is not an MLflow store (no alembic_version).")
            if src_rev != dst_rev:
                raise MigrationError(
                    f"schema revisions differ: {source_db} is at {src_rev}, the server's "
                    f"database at {dst_rev}. Fix: run the same MLflow version on both, e.g. "
                    f"`mlflow db upgrade sqlite:///{source_db}` with the server's MLflow."
                )
            busy = {t: _count(d, t) for t in ("runs", "registered_models")}
            if any(busy.values()):
                raise MigrationError(
                    f"the server's store is not empty ({busy['runs']} runs, "
                    f"{busy['registered_models']} registered models); a migration never merges."
                    " Fix: migrate right after `cubeline stack up` on a new stack (--dir)."
                )
        before = store_summary(f"sqlite:///{source_db}")
        rewrite, hits = _rewriter(artifacts_dir or Path("/nonexistent"), prefix)
        copied = _copy_rows(src, dst, rewrite)
    finally:
        src.dispose()
        dst.dispose()
    uploaded = 0
    if artifacts_dir is not None:
        import mlflow
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        mlflow.set_tracking_uri(tracking_uri)
        repo = get_artifact_repository(f"mlflow-artifacts:/{prefix.strip('/')}")
        repo.log_artifacts(str(artifacts_dir))
        uploaded = sum(1 for p in artifacts_dir.rglob("*") if p.is_file())
    after = store_summary(tracking_uri)
    if after != before:
        raise MigrationError(f"the copy read back through {tracking_uri} differs from the "
                             f"source: {before} != {after}")
    checked = _check_champions(tracking_uri, after["models"])
    return {
        "rows": copied,
        "locations_rewritten": hits[0],
        "files_uploaded": uploaded,
        "champions_downloaded": checked,
        "summary": after,
        "seconds": round(time.monotonic() - t0, 2),
    }


def _check_champions(tracking_uri: str, models: Iterable[str]) -> list[str]:
    """Download each champion's artifacts through the server (they must have moved too)."""
    import tempfile

    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient()
    done = []
    for name in models:
        rm = client.get_registered_model(name)
        if "champion" not in rm.aliases:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            try:
                mlflow.artifacts.download_artifacts(f"models:/{name}@champion", dst_path=tmp)
            except Exception as exc:
                raise MigrationError(
                    f"models:/{name}@champion does not download through {tracking_uri} after "
                    f"the migration ({exc}). Fix: check that --artifacts names the folder "
                    "its runs wrote to."
                ) from exc
        done.append(f"{name}@champion")
    return done
