"""The ``cubeline`` command.

``cubeline run`` is the main job: the ``retrain`` flow once on the bundled data with the embedded
defaults -- Prefect's temporary API server (no server to start), MLflow's SQLite store
``mlflow.db`` and artifacts ``mlartifacts/`` at the repository root, the repository's DVC remote
-- and a summary of what happened and where to look.

Everything heavy (prefect, mlflow, dvc, torch, lightning) is imported inside the command that
needs it, after telemetry is switched off: importing all of it up front would
dominate the start-up of every command.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flows.summary import _fmt, flow_run_url, print_summary
from tasks.env import RESUME_ENV, VERBOSE_ENV, disable_telemetry, repo_root, tune_allocator
from tasks.failures import EXIT_CODES, exit_code

__all__ = ["EXIT_CODES", "build_parser", "exit_code", "flow_run_url", "main", "print_summary"]


def _params_path(args: argparse.Namespace) -> Path:
    if args.params:
        p = Path(args.params).resolve()
        return p / "params.yaml" if p.is_dir() else p
    return repo_root() / "params.yaml"


#: Commands that run a flow in this process and print their own outcome (or one error line).
_IN_PROCESS_FLOWS = ("run", "train", "drift")


def _quiet(verbose: bool, command: str = "") -> None:
    """Library chatter off unless ``-v``: the summary is the output.

    For the commands that run a flow here, Prefect's console logs go too: a failure ends in one
    ``cubeline <cmd>: error: ...`` line (or a traceback for a bug), not in Prefect's copies of
    it. The logs still reach the Prefect API and UI. ``serve`` keeps warnings and errors, since
    its terminal is where served runs report.
    """
    level = "INFO" if verbose else "WARNING"
    console = "CRITICAL" if not verbose and command in _IN_PROCESS_FLOWS else level
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    else:
        # Deprecation notices of our libraries (Lightning's pytree, Prefect, MLflow) are theirs to
        # fix, not the operator's; -v shows them. The variable reaches served/worker subprocesses.
        for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
            warnings.filterwarnings("ignore", category=category)
        os.environ.setdefault(
            "PYTHONWARNINGS", "ignore::DeprecationWarning,ignore::FutureWarning"
        )
    # Only the console is quieted: flow and task logs still reach the Prefect API (and UI).
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", console)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", level)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", str(verbose).lower())


def _quiet_lightning(verbose: bool) -> None:
    # Lightning sets its loggers to INFO when imported, so this must follow the import.
    import lightning.pytorch  # noqa: F401

    from tasks.env import quiet_lightning

    quiet_lightning()


def _start_temporary_server() -> threading.Thread:
    """Start Prefect's temporary API server now, in the background, when no server is set.

    It takes seconds to come up, all of it in a subprocess: started before the
    heavy imports, it boots on the other core while this process imports torch and Lightning,
    instead of after them. The flow's client then finds it running (Prefect keeps one instance
    per process). Failures are left to the flow, which retries and reports them.
    """

    def start() -> None:
        from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

        from tasks.lifecycle import guard_prefect_temporary_server

        # Whatever ends this command (even SIGKILL), its temporary server does not outlive it.
        guard_prefect_temporary_server()
        if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
            return
        from prefect.server.api.server import SubprocessASGIServer

        with contextlib.suppress(Exception):
            SubprocessASGIServer().start()

    thread = threading.Thread(target=start, name="cubeline-prefect-server", daemon=True)
    thread.start()
    return thread


def _run_flow(args: argparse.Namespace, which: str) -> int:
    from flows import for_repo
    from tasks.lifecycle import check_data_links, probe_prefect_api
    from tasks.params import load_params

    # A params.yaml mistake, a dangling link, a broken .dvc file or a dead API fail now, not
    # after server start-up.
    loaded = load_params(_params_path(args))
    check_data_links(loaded, _params_path(args))
    probe_prefect_api()
    if args.data_version:
        from tasks.versioning import check_tree_hash

        check_tree_hash(args.data_version, "a data-version hash", "`cubeline ingest` output")
    else:
        from tasks.versioning import read_dvc_file

        read_dvc_file(_params_path(args).parent, loaded.data.dvc_file)
    os.environ[RESUME_ENV] = "1" if args.resume else "0"
    server = _start_temporary_server()
    _quiet_lightning(args.verbose)
    params = _params_path(args)
    if which == "train":
        from flows.train import train as flow_fn
    else:
        from flows.retrain import retrain as flow_fn
    server.join()
    start = time.perf_counter()
    summary = for_repo(flow_fn, params.parent)(
        params_path=str(params), reason=args.reason or "", data_version=args.data_version
    )
    seconds = time.perf_counter() - start
    if args.json:
        print(json.dumps({**summary.to_dict(), "seconds": seconds}, default=str))
    else:
        print_summary(summary, seconds)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """``cubeline run``: the retrain flow once."""
    return _run_flow(args, "retrain")


def cmd_train(args: argparse.Namespace) -> int:
    """``cubeline train``: two-phase training from scratch."""
    return _run_flow(args, "train")


def _split_arg(args: argparse.Namespace) -> Any:
    ids = (args.train, args.val, args.test)
    if all(i is None for i in ids):
        return None
    if any(i is None for i in ids):
        from nodes.errors import ConfigError

        raise ConfigError("give all three of --train, --val and --test (frame ids), or none")
    from tasks.data_versions import Split

    return Split(tuple(args.train), tuple(args.val), tuple(args.test))


def cmd_ingest(args: argparse.Namespace) -> int:
    """``cubeline ingest FILES``: validate new frames and store them as a data version."""
    from tasks.steps import ingest_files

    info = ingest_files(
        _params_path(args), args.paths, labels=args.labels, split=_split_arg(args)
    )
    if args.json:
        print(json.dumps(info.to_dict()))
        return 0
    names = info.frame_names
    print(f"data version {info.version} ({len(names)} frames, {info.channels} bands; DVC, pushed)")
    split = info.split
    for key, ids in (("train", split.train), ("val", split.val), ("test", split.test)):
        print(f"  {key:<6}{[names[i] for i in ids]}")
    print(f"  folder  {info.path}")
    print(f"next: cubeline drift --data-version {info.version}   (drift check; on drift the "
          "served retrain deployment re-initializes on it)")
    print(f"      cubeline run --data-version {info.version}     (train on it now)")
    return 0


def cmd_drift(args: argparse.Namespace) -> int:
    """``cubeline drift``: the drift_watch flow (emits the drift event on drift)."""
    from tasks.lifecycle import probe_prefect_api
    from tasks.params import load_params

    load_params(_params_path(args))
    probe_prefect_api()
    server = _start_temporary_server()
    import nodes.data.datamodule  # noqa: F401  (torch, Lightning: imported while it boots)
    from flows import for_repo
    from flows.drift_watch import drift_watch

    params = _params_path(args)
    version = args.data_version
    if args.paths:
        from tasks.steps import ingest_files

        version = ingest_files(params, args.paths, labels=args.labels).version
        print(f"ingested as data version {version}")
    server.join()
    result = for_repo(drift_watch, params.parent)(params_path=str(params), data_version=version)
    if args.json:
        print(json.dumps(result.__dict__, default=str))
        return 0
    print(f"drift: {'DRIFT' if result.drifted else 'no drift'} (data {result.data_version})")
    print(f"  reason   {result.reason}")
    if result.report_path:
        print(f"  report   {result.report_path}")
        print(f"  plot     {result.plot_path}")
    if result.drifted:
        print(f"  event    cubeline.drift.detected {result.event_id} emitted: a served retrain "
              "deployment re-initializes on this data version")
    return 1 if result.drifted and args.exit_code else 0


def _configure_registry(args: argparse.Namespace) -> Any:
    from tasks.params import load_params
    from tasks.tracking import configure_mlflow

    params_path = _params_path(args)
    params = load_params(params_path)
    configure_mlflow(
        params.mlflow.tracking_uri, params_path.parent, experiment_name=params.mlflow.experiment
    )
    return params


def cmd_promote(args: argparse.Namespace) -> int:
    """``cubeline promote --version N``: move champion (forced, or through the gate)."""
    from tasks.registry import promote_version

    params = _configure_registry(args)
    decision = promote_version(
        params.registry.model_name,
        args.version,
        args.reason or "cubeline promote",
        params.registry.gate if args.gate else None,
    )
    verb = "promoted" if decision.promote else "not promoted"
    print(f"version {args.version}: {verb}: {decision.reason}")
    return 0 if decision.promote else 1


def cmd_rollback(args: argparse.Namespace) -> int:
    """``cubeline rollback``: champion back to the previous champion."""
    from tasks.registry import rollback

    params = _configure_registry(args)
    entry = rollback(params.registry.model_name, args.reason or "cubeline rollback")
    print(
        f"champion of {params.registry.model_name}: version {entry.previous_version} -> "
        f"{entry.version} ({entry.reason})"
    )
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    """``cubeline history``: who held champion, when and why."""
    from tasks.registry import champion_history

    params = _configure_registry(args)
    for e in champion_history(params.registry.model_name):
        until = f"until {e.replaced_at} (by v{e.replaced_by})" if e.replaced_by else "current"
        print(f"v{e.version:<4} {e.action:<8} {e.at}  {until}\n      {e.reason}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """``cubeline predict FILES``: anomaly maps from the champion."""
    from tasks.predict import predict_cubes

    scored = predict_cubes(_params_path(args), args.paths, Path(args.out), alias=args.alias)
    print(f"scored by {scored.model_uri} (version {scored.version}, alias {args.alias})")
    for path in scored.files:
        print(path)
    return 0


def cmd_serve_model(args: argparse.Namespace) -> int:
    """``cubeline serve-model``: answer scoring requests with the champion on 127.0.0.1."""
    from tasks.serving import serve_model

    params = _configure_registry(args)
    serve_model(
        params.registry.model_name,
        alias=args.alias,
        host="127.0.0.1",
        port=args.port,
        poll_s=args.poll_s,
        expected_channels=params.data.expected_channels,
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """``cubeline serve``: deployments (cron, interval, drift trigger) against a server."""
    from flows.deploy import serve

    serve(_params_path(args))
    return 0


def cmd_phase1(args: argparse.Namespace) -> int:
    """``cubeline phase1``: Phase 1 alone on the session, per-frame AUC/AP and timing."""
    from tasks.predict import phase1_report

    rep = phase1_report(_params_path(args))
    if args.json:
        print(json.dumps(rep))
        return 0
    print(f"{'frame':<22} {'split':<6} {'anomaly px':>10} {'AUROC':>8} {'AP':>8}")
    for r in rep["frames"]:
        print(
            f"{r['frame']:<22} {r['split']:<6} {r['anomaly_px']:>10} {_fmt(r['auroc']):>8} "
            f"{_fmt(r['ap']):>8}"
        )
    print(
        f"Phase 1: {rep['passes']} pass(es) over {rep['pixels']} pixels in {rep['seconds']:.2f} s "
        f"(reading + validating the frames: {rep['setup_seconds']:.2f} s)"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used by the docs)."""
    parser = argparse.ArgumentParser(
        prog="cubeline",
        description="Two-phase hyperspectral anomaly detection, orchestrated by Prefect, "
        "tracked by MLflow, versioned by DVC.",
    )
    parser.add_argument("--params", help="params.yaml (default: the repository's)")
    parser.add_argument("-v", "--verbose", action="store_true", help="show library logs")
    sub = parser.add_subparsers(dest="command", required=True)

    for name, fn, text in (
        ("run", cmd_run, "retrain once on the bundled data and print a summary (main job)"),
        ("train", cmd_train, "two-phase training from scratch"),
    ):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--reason", help="why this run happens (kept in MLflow and the registry)")
        p.add_argument("--data-version", help="train on this data version (cubeline ingest)")
        p.add_argument("--json", action="store_true", help="print the summary as JSON")
        p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                       help="continue an interrupted Phase 2 of the same data, params and "
                       "Phase-1 state from its last epoch (default; --no-resume starts over)")
        p.set_defaults(func=fn)

    p = sub.add_parser("ingest", help="validate new frames and store them as a data version")
    p.add_argument("paths", nargs="+", help=".mat / .npz / .cu3s frames, in frame order")
    p.add_argument("--labels", help="COCO JSON labelling the frames (image_id = frame id)")
    for split in ("train", "val", "test"):
        p.add_argument(f"--{split}", type=int, nargs="+", help=f"{split} frame ids")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("drift", help="drift check of a data version against the champion")
    p.add_argument("paths", nargs="*", help="new frames: ingested as a data version first "
                   "(default: --data-version, else the frames in ingest.inbox)")
    p.add_argument("--data-version", help="check this data version")
    p.add_argument("--labels", help="COCO JSON for the frames given")
    p.add_argument("--json", action="store_true")
    p.add_argument("--exit-code", action="store_true", help="exit 1 when drift is found")
    p.set_defaults(func=cmd_drift)

    p = sub.add_parser("promote", help="move alias champion to a version")
    p.add_argument("--version", required=True, help="model version to promote")
    p.add_argument("--reason")
    p.add_argument("--gate", action="store_true", help="only if the params.yaml gate agrees")
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("rollback", help="move champion back to the previous champion")
    p.add_argument("--reason")
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("history", help="champion history of the registered model")
    p.set_defaults(func=cmd_history)

    p = sub.add_parser("predict", help="score frames with models:/<name>@champion")
    p.add_argument("paths", nargs="+", help=".mat / .npz / .cu3s frames")
    p.add_argument("--out", default="outputs/predictions", help="output directory")
    p.add_argument("--alias", default="champion")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("serve", help="serve the scheduled/triggered deployments (needs a server)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("serve-model", help="answer scoring requests with the champion (HTTP)")
    p.add_argument("--port", type=int, default=8088)
    p.add_argument("--alias", default="champion")
    p.add_argument("--poll-s", type=float, default=2.0, help="how often the alias is checked")
    p.set_defaults(func=cmd_serve_model)

    p = sub.add_parser("phase1", help="Phase 1 alone: per-frame AUC/AP and the time it took")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_phase1)

    from flows.stack import add_parser as add_stack_parser

    add_stack_parser(sub)  # cubeline stack up|down|status|join|deploy|migrate (team stack)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cubeline`` console script.

    Args:
        argv: Arguments; None reads ``sys.argv`` and, being the real command line, ends the
            process through :func:`_exit_fast` once the command is done.
    """
    disable_telemetry()
    # The store the user exported, captured before any MLflow call rewrites the variable (only
    # on the real command line: in a Python process the variable may be MLflow's own).
    if argv is None and os.environ.get("MLFLOW_TRACKING_URI"):
        os.environ.setdefault("CUBELINE_MLFLOW_TRACKING_URI", os.environ["MLFLOW_TRACKING_URI"])
    if argv is None:
        # The real command line owns this process: keep frame-sized buffers on the heap instead
        # of mapping and faulting them in again for every batch (tasks.env.tune_allocator; the
        # same setting the local Dask workers get, so in-process and sharded compare alike).
        tune_allocator()
    args = build_parser().parse_args(argv)
    _quiet(args.verbose, args.command)
    if argv is None:
        _stop_on_sigterm()
    from tasks.failures import report

    try:
        rc = int(args.func(args))
    except SystemExit:
        raise
    except BaseException as exc:  # every failure ends in one line (tasks.failures)
        rc = report(args.command, exc, args.verbose)
    if argv is None:
        _exit_fast(rc)
    return rc


def _stop_on_sigterm() -> None:
    """SIGTERM ends a command like Ctrl-C: runs close as KILLED, servers and children stop.

    The exit handlers then run (Prefect stops its temporary server, logs are flushed) instead of
    the process vanishing with its children left behind.
    """
    import signal

    from tasks.lifecycle import note_signal

    def interrupt(signum: int, frame: Any) -> None:
        note_signal(signum)
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)


def _exit_fast(rc: int) -> None:
    """Run the exit handlers, then leave without tearing the interpreter down.

    Everything that must happen at exit is an ``atexit`` handler (Prefect drains its event and
    log workers and stops its temporary server there; logging flushes). What is skipped is the
    interpreter's own finalization -- garbage-collecting torch, MLflow and SQLAlchemy objects,
    which takes seconds after the work is done.
    """
    import atexit

    sys.stdout.flush()
    sys.stderr.flush()
    handlers = sys.modules.get("prefect.logging.handlers")
    if handlers is not None:
        # Send the run's last logs while the API server is still up: the temporary server's
        # exit handler may otherwise stop it before logging's own flush runs.
        with contextlib.suppress(Exception):
            handlers.APILogWorker.drain_all(timeout=5)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    raise SystemExit(main())
