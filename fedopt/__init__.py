"""fedopt: federated and decentralized training for PyTorch.

The core every mode shares: the Task API, ParamSpec, aggregators, server optimizers, data, config and metrics.
Importing ``fedopt`` is light; torch-heavy pieces load with the submodules that need them.
"""

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    AuthError, ConfigError, DataError, FedoptError, RoundError, SecAggError, TaskError, WireError,
)

__all__ = [
    "__version__",
    "FedoptError", "ConfigError", "TaskError", "DataError", "WireError", "AuthError", "SecAggError", "RoundError",
]
