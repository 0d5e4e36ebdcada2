"""Prefect tasks of cubeline: one task per pipeline step, thin wrappers around ``nodes``.

Importing the package turns telemetry off first, so every ``from tasks... import`` is safe even
when it is the first import of a process (the settings are read when prefect/mlflow/dvc load).
Submodules are imported lazily by their users: importing everything up front takes seconds.
"""

from tasks.env import disable_telemetry

disable_telemetry()
