"""Fault injection for the fault suite (``tests/faults``): die or fail at a named point.

``$CUBELINE_FAULT`` holds ``<point>:<action>`` items separated by ``|`` or ``,``. Points:
``phase1`` (Phase 1 about to fit), ``phase2_epoch<N>`` (end of Phase-2 epoch N, from 0),
``register`` (registration about to start). Actions: ``kill`` (SIGKILL this process), ``term``
(SIGTERM), ``int`` (SIGINT), ``raise`` (:class:`InjectedFaultError`), ``sleep<seconds>``. Unset in
normal use; the registry's own finer points are ``$CUBELINE_REGISTRY_FAULT``
(:mod:`tasks.registry.base`).
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

FAULT_ENV = "CUBELINE_FAULT"


class InjectedFaultError(RuntimeError):
    """Raised at a point named in ``$CUBELINE_FAULT`` with the action ``raise`` (tests only)."""


def fault(point: str) -> None:
    """Act on ``$CUBELINE_FAULT`` if it names ``point``; nothing otherwise."""
    spec = os.environ.get(FAULT_ENV, "")
    for item in spec.replace(",", "|").split("|"):
        name, _, action = item.strip().partition(":")
        if name != point:
            continue
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "term":
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises in the main thread meanwhile
        elif action == "int":
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        elif action.startswith("sleep"):
            time.sleep(float(action[len("sleep"):]))
        else:
            raise InjectedFaultError(f"fault injected at {point!r} by ${FAULT_ENV}")


def epoch_fault_callback() -> Any:
    """A Lightning callback calling :func:`fault` with ``phase2_epoch<N>`` after each epoch."""
    from lightning.pytorch.callbacks import Callback

    class _EpochFault(Callback):
        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            fault(f"phase2_epoch{trainer.current_epoch}")

    return _EpochFault()
