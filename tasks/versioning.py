"""DVC versioning of the data and of Phase-1 initialization states, through DVC's Python API.

**Data.** ``data.dvc`` records the MD5 content hash DVC computed for ``data/``. A run's data
version is that hash, checked against the workspace with DVC's own hashing: DVC keeps file
hashes in its state database keyed by inode, size and mtime, so the check is cheap after the
first run and never reads tensors (far cheaper than a ``dvc`` CLI call, mostly start-up). A
workspace that differs from ``data.dvc`` is still hashed exactly; the run is then marked dirty.

**Initialization states.** A state is a directory holding ``init_state.pt`` and its JSON sidecar
(:func:`nodes.training.init_state.save_init_state`). :func:`version_init_state` stores it as one
DVC tree
object -- the same content-addressed layout ``dvc add`` produces, hash ``<md5>.dir`` -- in the
local DVC cache and pushes it to the repository's DVC remote. No ``.dvc`` file is written: the
state's hash is recorded in MLflow (tag ``cubeline.init_state_hash``), which is the index of
states, so runs never leave changes in the git tree. :func:`restore_init_state` checks a state
out again by its hash, from the cache or, when the cache lacks it (fresh clone, other machine),
from the remote (``dvc pull`` by object id).

dvc is imported inside the functions: ``import dvc.repo`` is slow, and most commands never need it.

Why one module of over 400 lines: data versions and state versions share the DVC repo
handle, its lock and the content-hash checks; the per-run data lookup is
:mod:`tasks.data_versions`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from nodes.errors import ConfigError, DataValidationError

if TYPE_CHECKING:
    from dvc.repo import Repo

log = logging.getLogger(__name__)

STATE_FILE = "init_state.pt"
STATE_META = "init_state.json"
HASH_NAME = "md5"


@dataclass(frozen=True)
class DataVersion:
    """The version of the data a run reads.

    Attributes:
        content_hash: DVC MD5 of what is in the workspace (equals ``recorded_hash`` when clean).
        recorded_hash: The MD5 that ``dvc_file`` records.
        dvc_file: The ``.dvc`` file, relative to the repository root.
        out_path: The directory it tracks, relative to the repository root.
        dirty: The workspace differs from ``dvc_file`` (run ``dvc add`` to version it).
    """

    content_hash: str
    recorded_hash: str
    dvc_file: str
    out_path: str
    dirty: bool


@contextmanager
def open_repo(root: Path) -> Iterator[Repo]:
    """Open the DVC repository at ``root`` (closed on exit)."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        repo = Repo(os.fspath(root))
    except NotDvcRepoError:
        raise ConfigError(
            f"{root} is not a DVC repository (no .dvc/ directory); run cubeline from its "
            "repository root, or `dvc init` there"
        ) from None
    try:
        yield repo
    finally:
        repo.close()


def read_dvc_file(root: Path, dvc_file: str = "data.dvc") -> tuple[str, str]:
    """Return ``(md5, tracked path)`` recorded in a single-output ``.dvc`` file.

    Raises:
        ConfigError: The file is missing or does not record one output with an MD5.
    """
    path = root / dvc_file
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"{path} does not exist; params.yaml data.dvc_file must name the .dvc file that "
            "tracks the data (create it with `dvc add data`)"
        ) from None
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as exc:
        raise ConfigError(
            f"{path} is not a readable .dvc file ({type(exc).__name__}: {exc}); restore it with "
            f"`git checkout -- {dvc_file}`"
        ) from None
    outs = doc.get("outs") if isinstance(doc, dict) else None
    if not outs or not isinstance(outs, list) or len(outs) != 1 or "md5" not in outs[0]:
        raise ConfigError(
            f"{path} must record exactly one output with an md5 (as `dvc add data` writes it)"
        )
    return str(outs[0]["md5"]), str(outs[0]["path"])


def _workspace_hash(repo: Repo, path: Path, *, inside: bool = True) -> str:
    """DVC's MD5 of ``path`` as it is now, from DVC's inode/mtime-keyed state when unchanged."""
    from dvc_data.hashfile.build import build

    cache = repo.cache.local
    _, _, obj = build(
        cache,
        os.fspath(path.resolve()),
        cache.fs,
        HASH_NAME,
        dry_run=True,
        state=repo.state,
        # .dvcignore patterns are relative to the repository: they only apply inside it.
        ignore=repo.dvcignore if inside else None,
    )
    return str(obj.hash_info.value)


def data_version(root: Path, dvc_file: str = "data.dvc", paths: Sequence[Path] = ()) -> DataVersion:
    """Content hash of the data, as recorded in ``dvc_file`` and checked against the workspace.

    Files outside the tracked directory (new frames not versioned yet, e.g. what drift_watch
    reads) are hashed file by file with DVC's hashing; their combined hash stands for the data
    and the version is marked dirty.

    Args:
        root: Repository root.
        dvc_file: The ``.dvc`` file tracking the data directory.
        paths: Files the run reads.

    Returns:
        The data version (``dirty`` when the workspace differs from ``dvc_file``).

    Raises:
        ConfigError: ``dvc_file`` is invalid.
        DataValidationError: The tracked directory or a listed file is missing.
    """
    recorded, out = read_dvc_file(root, dvc_file)
    out_dir = (root / out).resolve()
    if not out_dir.exists():
        raise DataValidationError(
            f"{out_dir} (tracked by {dvc_file}) is missing; run `dvc pull {dvc_file}`"
        )
    outside = [Path(p) for p in paths if not Path(p).resolve().is_relative_to(out_dir)]
    missing = [str(p) for p in outside if not p.exists()]
    if missing:
        raise DataValidationError(f"data files {missing} do not exist; check the paths")
    # A flow asks twice within a second (cache key, then the step): skip opening the DVC
    # repository again when no file changed, as DVC's own state would (inode, mtime, size).
    memo_key = (str(root.resolve()), dvc_file, tuple(str(p) for p in paths))
    stamp = _fingerprint([root / dvc_file, out_dir, *outside])
    hit = _VERSION_MEMO.get(memo_key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    version = _data_version(root, recorded, out, out_dir, dvc_file, paths, outside)
    _VERSION_MEMO[memo_key] = (stamp, version)
    return version


_VERSION_MEMO: dict[tuple[str, str, tuple[str, ...]], tuple[tuple[Any, ...], DataVersion]] = {}


def _fingerprint(paths: Sequence[Path]) -> tuple[Any, ...]:
    """(path, inode, size, mtime) of every file under ``paths``."""
    out: list[Any] = []
    for p in paths:
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            st = f.stat()
            out.append((str(f), st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def _data_version(
    root: Path,
    recorded: str,
    out: str,
    out_dir: Path,
    dvc_file: str,
    paths: Sequence[Path],
    outside: Sequence[Path],
) -> DataVersion:
    with open_repo(root) as repo:
        if outside:
            parts = [[Path(p).name, _workspace_hash(repo, Path(p), inside=False)] for p in paths]
            digest = hashlib.md5(json.dumps(parts).encode(), usedforsecurity=False).hexdigest()
            log.warning(
                "%s lie outside %s (tracked by %s): hashed file by file, not versioned; move "
                "them there and run `dvc add %s` to version them",
                [str(p) for p in outside],
                out,
                dvc_file,
                out,
            )
            return DataVersion(f"{digest}.files", recorded, dvc_file, out, dirty=True)
        current = _workspace_hash(repo, out_dir)
    dirty = current != recorded
    if dirty:
        log.warning(
            "%s differs from %s (workspace %s, recorded %s): this run uses the workspace; "
            "run `dvc add %s` and commit %s to version it",
            out,
            dvc_file,
            current,
            recorded,
            out,
            dvc_file,
        )
    return DataVersion(current, recorded, dvc_file, out, dirty)


def ensure_data(root: Path, dvc_file: str = "data.dvc", remote: str | None = None) -> bool:
    """Check the tracked data out (from the cache, else the remote) when it is absent.

    Returns:
        True when data was restored, False when it was already there.
    """
    _, out = read_dvc_file(root, dvc_file)
    if (root / out).exists():
        return False
    with open_repo(root) as repo:
        repo.pull(targets=[os.fspath(root / dvc_file)], remote=remote)
    return True


def _push(repo: Repo, hashes: list[Any], remote: str | None, what: str) -> None:
    from dvc.exceptions import DvcException

    try:
        result = repo.cloud.push(hashes, remote=remote)
    except DvcException as exc:
        raise ConfigError(
            f"dvc push of {what} to remote {remote or '(default)'} failed: {exc}; check the "
            "remote in .dvc/config (params.yaml dvc.remote)"
        ) from exc
    if result.failed:
        raise ConfigError(
            f"dvc push of {what} to remote {remote or '(default)'} failed for "
            f"{sorted(h.value for h in result.failed)}"
        )


def store_tree(src_dir: Path, *, root: Path, remote: str | None, what: str) -> str:
    """Store a directory in the DVC cache as one tree object and push it to ``remote``.

    The layout is the one ``dvc add`` produces (hash ``<md5>.dir``), without a ``.dvc`` file:
    the caller records the hash (MLflow tags, event payloads), so the git tree stays clean.

    Args:
        src_dir: The directory to store (left in place).
        root: Repository root (the DVC repository).
        remote: DVC remote to push to (None: the default remote; no remote configured: kept in
            the local cache only, with a warning).
        what: What is stored, for messages (``"init state"``, ``"data version"``).

    Returns:
        The tree's DVC hash, ``<md5>.dir``.

    Raises:
        ConfigError: The push fails.
    """
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.transfer import transfer

    with open_repo(root) as repo:
        cache = repo.cache.local
        # A resolved path: with ".." in it DVC records "/name" as the relpath (another hash).
        staging, _, obj = build(cache, os.fspath(src_dir.resolve()), cache.fs, HASH_NAME)
        children = [oid for _, _, oid in obj]  # type: ignore[attr-defined]
        transfer(staging, cache, {obj.hash_info, *children}, shallow=False, hardlink=False)
        tree_hash = str(obj.hash_info.value)
        if remote is None and not repo.config["core"].get("remote"):
            log.warning("no DVC remote configured: %s %s kept in the cache only", what, tree_hash)
        else:
            _push(repo, [obj.hash_info, *children], remote, f"{what} {tree_hash}")
    return tree_hash


def restore_tree(
    tree_hash: str, *, root: Path, remote: str | None, target: Path, what: str
) -> Path:
    """Check the tree ``tree_hash`` out into ``target`` (kept when already intact).

    From the DVC cache, pulling the tree and its files from the remote first when the cache lacks
    them (a fresh clone, another machine).

    Args:
        tree_hash: ``<md5>.dir`` as :func:`store_tree` returned it.
        root: Repository root (the DVC repository).
        remote: DVC remote to pull from (None: the default remote).
        target: Where the tree is checked out.
        what: What is restored, for messages.

    Returns:
        ``target``.

    Raises:
        ConfigError: The tree is found neither in the cache nor on the remote.
    """
    from dvc_data.hashfile import load
    from dvc_data.hashfile.checkout import CheckoutError, checkout
    from dvc_data.hashfile.hash_info import HashInfo

    with open_repo(root) as repo:
        if target.is_dir() and _workspace_hash(repo, target, inside=False) == tree_hash:
            return target
        cache = repo.cache.local
        tree_id = HashInfo(HASH_NAME, tree_hash)
        if not cache.exists(tree_hash):
            _pull(repo, [tree_id], remote, f"{what} {tree_hash}")
        tree = load(cache, tree_id)
        missing = [oid for _, _, oid in tree if not cache.exists(oid.value)]  # type: ignore[attr-defined]
        if missing:
            _pull(repo, missing, remote, f"{what} {tree_hash}")
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.parent / f".restore-{uuid.uuid4().hex}"
        try:
            try:
                checkout(os.fspath(staging), cache.fs, tree, cache, relink=False)
                # Trust nothing on disk: a cache object replaced by other (valid-looking)
                # content must not pass for the hash the run records.
                bad = _altered_files(staging, tree)
            except CheckoutError:
                # DVC refused an object itself; name the altered ones.
                bad = [
                    "/".join(key)
                    for key, _, oid in tree  # type: ignore[attr-defined]
                    if _md5(Path(cache.oid_to_path(oid.value))) != oid.value
                ] or ["(DVC checkout failed)"]
            if bad:
                raise ConfigError(
                    f"{what} {tree_hash}: the DVC cache ({cache.path}) holds other content under "
                    f"its hash for {bad}; delete those cache objects (or .dvc/cache) and run "
                    "again to pull them from the remote"
                )
            if target.exists():
                shutil.rmtree(target)
            _move_into_place(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _altered_files(root: Path, tree: Any) -> list[str]:
    """Files under ``root`` whose MD5, read afresh, is not the one ``tree`` records.

    DVC's checkout records the *expected* hash of each file it writes in its state database, so
    DVC's own hashing would only repeat what it was told; this reads every byte.
    """
    return ["/".join(key) for key, _, oid in tree if _md5(root.joinpath(*key)) != oid.value]


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with path.open("rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
    except OSError:
        return ""
    return digest.hexdigest()


def version_init_state(state_dir: Path, *, root: Path, remote: str | None, states_dir: Path) -> str:
    """Store an initialization state in the DVC cache under its content hash and push it.

    Args:
        state_dir: Directory holding ``init_state.pt`` and ``init_state.json`` (a staging copy;
            it is moved to ``states_dir/<md5>`` on success).
        root: Repository root (the DVC repository).
        remote: DVC remote to push to (None: the default remote; no remote configured: kept in
            the local cache only, with a warning).
        states_dir: Where checked-out states live (``<md5>/init_state.pt``).

    Returns:
        The state's DVC hash, ``<md5>.dir``.

    Raises:
        ConfigError: The state files are missing, or the push fails.
    """
    files = sorted(p.name for p in state_dir.iterdir()) if state_dir.is_dir() else []
    if files != sorted([STATE_FILE, STATE_META]):
        raise ConfigError(
            f"{state_dir} must hold exactly {STATE_FILE} and {STATE_META} (found {files}); "
            "write them with nodes.training.init_state.save_init_state"
        )
    state_hash = store_tree(state_dir, root=root, remote=remote, what="init state")
    _move_into_place(state_dir, states_dir / _folder(state_hash))
    return state_hash


def restore_init_state(
    state_hash: str, *, root: Path, remote: str | None, states_dir: Path
) -> Path:
    """Return the ``init_state.pt`` of the state with DVC hash ``state_hash``.

    Uses the checked-out copy in ``states_dir`` when it is intact, else checks the state out
    from the DVC cache, pulling it from the remote first when the cache lacks it.

    Args:
        state_hash: The hash :func:`version_init_state` returned (``<md5>.dir``).
        root: Repository root (the DVC repository).
        remote: DVC remote to pull from (None: the default remote).
        states_dir: Where checked-out states live.

    Returns:
        Path of ``init_state.pt`` (its JSON sidecar lies beside it).

    Raises:
        ConfigError: The hash is malformed or found neither in the cache nor on the remote.
    """
    check_tree_hash(state_hash, "an initialization-state hash", "the MLflow tag "
                    "cubeline.init_state_hash")
    target = states_dir / _folder(state_hash)
    restore_tree(state_hash, root=root, remote=remote, target=target, what="init state")
    return target / STATE_FILE


def check_tree_hash(value: str, what: str, where: str) -> None:
    """Raise a :class:`ConfigError` unless ``value`` looks like ``<32 hex digits>.dir``."""
    body = value.removesuffix(".dir")
    if not value.endswith(".dir") or len(body) != 32 or any(
        c not in "0123456789abcdef" for c in body
    ):
        raise ConfigError(
            f"{value!r} is not {what} (expected 32 lowercase hex digits + '.dir', as recorded in "
            f"{where})"
        )


def _pull(repo: Repo, hashes: list[Any], remote: str | None, what: str) -> None:
    from dvc.exceptions import DvcException

    try:
        result = repo.cloud.pull(hashes, remote=remote)
    except DvcException as exc:
        raise ConfigError(
            f"{what} is not in the DVC cache and pulling it from remote "
            f"{remote or '(default)'} failed: {exc}"
        ) from exc
    if result.failed or not all(repo.cache.local.exists(h.value) for h in hashes):
        raise ConfigError(
            f"{what} is neither in the DVC cache ({repo.cache.local.path}) nor on remote "
            f"{remote or '(default)'}; it was never pushed from the machine that created it"
        )


def _folder(state_hash: str) -> str:
    return state_hash.removesuffix(".dir")


def _move_into_place(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; an existing ``dst`` (same content hash) wins."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        src.rename(dst)
    except OSError:
        if not dst.is_dir():
            raise
        # Another run versioned the same content first: identical by construction.
        shutil.rmtree(src, ignore_errors=True)
