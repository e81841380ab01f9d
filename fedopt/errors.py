"""The exception tree of fedopt, drawn once.

::

    FedoptError                 anything fedopt raises on purpose; the CLI prints one line and exits
    ├── ConfigError             an invalid option, config file or config value (exit code 2)
    ├── TaskError               a task that cannot be resolved or does not honour the Task contract (exit 2)
    ├── DataError               a dataset or partition that cannot be made (exit 2)
    ├── WireError               a malformed, oversized or unexpected message (logged; the process carries on)
    ├── AuthError               missing or wrong CurveZMQ keys (exit 2)
    ├── SecAggError             a secure-aggregation step that cannot proceed (the round aborts)
    └── RoundError              a round that cannot complete (quorum not met, every update rejected)

Every error's message names the offending field, file or peer, so one line is enough for the user.
"""

from __future__ import annotations

__all__ = [
    "FedoptError",
    "ConfigError",
    "TaskError",
    "DataError",
    "WireError",
    "AuthError",
    "SecAggError",
    "RoundError",
]


class FedoptError(Exception):
    """Base of every error fedopt raises deliberately."""

    #: process exit code when this error ends a command-line run
    exit_code = 1


class ConfigError(FedoptError, ValueError):
    """An option, config file or config value is invalid; the message names it."""

    exit_code = 2


class TaskError(FedoptError):
    """A task name cannot be resolved, or a task breaks the Task contract."""

    exit_code = 2


class DataError(FedoptError, ValueError):
    """A dataset or a partition cannot be built (e.g. more clients than samples)."""

    exit_code = 2


class WireError(FedoptError):
    """A message failed validation; nothing was allocated for its declared size."""


class AuthError(FedoptError):
    """CurveZMQ keys are missing, unreadable or not admitted."""

    exit_code = 2


class SecAggError(FedoptError):
    """A secure-aggregation step cannot proceed (too few survivors, inconsistent request, bad share)."""


class RoundError(FedoptError):
    """A round cannot complete (quorum not met, every update rejected)."""
