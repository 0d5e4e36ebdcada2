"""Which lock serializes registry moves (no database needed; the lock itself is exercised
against a real PostgreSQL in tests/flows/test_stack_services.py)."""

from __future__ import annotations

import logging

import pytest

from tasks.registry import lock as registry_lock


@pytest.fixture()
def registry_uri(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    uri = ["sqlite:////tmp/x/mlflow.db"]
    import mlflow

    monkeypatch.setattr(mlflow, "get_registry_uri", lambda: uri[0])
    monkeypatch.delenv(registry_lock.LOCK_ENV, raising=False)
    return uri


def test_lock_database_choice(registry_uri: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    assert registry_lock._lock_database() is None  # embedded SQLite: the host-local file lock
    registry_uri[0] = "http://mlflow:5000"
    assert registry_lock._lock_database() is None
    registry_uri[0] = "postgresql+psycopg://u:p@db:5432/mlflow"
    assert registry_lock._lock_database() == registry_uri[0]  # a PostgreSQL store locks on itself
    monkeypatch.setenv(registry_lock.LOCK_ENV, "postgresql://registry_lock:pw@db:5432/mlflow")
    registry_uri[0] = "http://mlflow:5000"
    assert registry_lock._lock_database() == "postgresql://registry_lock:pw@db:5432/mlflow"


def test_redact_hides_the_password() -> None:
    assert registry_lock._redact("postgresql://registry_lock:s3cr3t@127.0.0.1:5432/mlflow") == (
        "postgresql://registry_lock:***@127.0.0.1:5432/mlflow")
    assert registry_lock._redact("postgresql://127.0.0.1/mlflow") == "postgresql://127.0.0.1/mlflow"


def test_remote_registry_without_lock_database_warns_once(
    registry_uri: list[str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    registry_uri[0] = "http://127.0.0.1:1"
    monkeypatch.setattr(registry_lock, "_warned_host_local", False)
    with caplog.at_level(logging.WARNING, logger="tasks.registry"):
        with registry_lock._registry_lock(5.0):
            pass
        with registry_lock._registry_lock(5.0):
            pass
    warnings = [r for r in caplog.records if registry_lock.LOCK_ENV in r.getMessage()]
    assert len(warnings) == 1 and "this host only" in warnings[0].getMessage()


def test_unreachable_lock_database_names_the_fix(
    registry_uri: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.flows.helpers import free_port

    monkeypatch.setenv(registry_lock.LOCK_ENV, f"postgresql://registry_lock:pw@127.0.0.1:{free_port()}/m")
    with pytest.raises(registry_lock.RegistryError) as info, registry_lock._registry_lock(1.0):
        pass
    text = str(info.value)
    assert registry_lock.LOCK_ENV in text and "cubeline stack up" in text and ":pw@" not in text
