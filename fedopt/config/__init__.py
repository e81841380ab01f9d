"""Run configuration: cohesive frozen sections, each validated once in ``__post_init__``, loadable from TOML.

A :class:`RunConfig` is the run's identity (task, seed, device, outputs) plus its sections::

    train       TrainingConfig    how each selected client trains (local SGD, its optimizer, schedule, FedProx)
    federation  FederationConfig  clients, rounds, sampling, stragglers, aggregation and the server step
    secagg      SecAggConfig      secure aggregation's graph, threshold and quantisation (--aggregator secagg)
    bus         BusConfig         deadlines, quorum, heartbeats, upload credit: runs over the ZeroMQ bus
    bounds      Bounds            how far one client's claims may move a round (fedopt.engine)
    sim         SimConfig         how ``fedopt simulate`` runs: in-process backend, workers, processes, gossip
    privacy     PrivacyConfig     client-level differential privacy (--dp central): noise, clip, budget, accountant
    compression CompressionConfig update compression (--compress SPEC) and error feedback
    robust      RobustConfig      Byzantine clients in simulation (--attack, --attackers) and client momentum

Users see one flat namespace: each flag and TOML key (``local-epochs`` or ``local_epochs``) names exactly one field of
one section, so :meth:`RunConfig.of`, :func:`build_config` and :meth:`RunConfig.replace` take flat names and route
them. Precedence: built-in defaults < the TOML file (``--config``) < command-line flags. A TOML file holds the flat
names at top level or under a ``[simulate]`` table, plus optional tables ``[task-options]``,
``[aggregator-options]`` and ``[server-options]``. An unknown key is an error naming the key; an invalid value is an
error naming the flag.
"""

from .run import (FIELDS, SECTIONS, RunConfig, build_config, load_command_toml, load_toml, normalise_keys,
                  read_toml)
from .robust import RobustConfig
from .sections import (Bounds, BusConfig, FederationConfig, OptimizerConfig, PrivacyConfig, SecAggConfig, SimConfig,
                       TrainingConfig, at_least, choice, number, optional)

__all__ = ["RunConfig", "OptimizerConfig", "TrainingConfig", "FederationConfig", "SecAggConfig", "BusConfig", "Bounds",
           "SimConfig", "PrivacyConfig", "RobustConfig", "FIELDS", "SECTIONS", "load_toml", "load_command_toml",
           "build_config", "read_toml", "normalise_keys", "choice", "at_least", "number", "optional"]
