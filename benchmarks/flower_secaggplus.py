"""One round of Flower's own SecAgg+ (``SecAggPlusWorkflow`` + ``secaggplus_mod``) in Flower's simulation engine.

Run by ``benchmarks/secagg.py`` in a child process (Flower and Ray are a benchmark-only extra:
``pip install 'fedopt[bench]'``). The round is the same work as fedopt's: each of ``n`` clients returns a random
update of ``P`` float32 values (no training), and a ``dropout`` fraction of them stop answering in the
collect-masked-vectors stage (they shared keys but their masked vectors never arrive: the expensive dropout case).
A client drops by raising in a Flower mod placed before ``secaggplus_mod``: the message comes back as an error and
the workflow counts that node as dead, exactly as when a real node fails.

Prints one JSON line: ``{"n", "P", "dropout", "round_seconds", "aggregate_ok"}``. ``round_seconds`` is the time
the ServerApp spends in the fit workflow (setup, share keys, masked vectors, unmask, aggregate).

Usage: python benchmarks/flower_secaggplus.py N P DROPOUT [NUM_SHARES THRESHOLD]
"""

from __future__ import annotations

import json
import logging
import sys
import time

import numpy as np
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import Context, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.simulation import run_simulation


def main() -> None:
    n, P, dropout = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    shares = int(sys.argv[4]) if len(sys.argv) > 4 else None
    threshold = int(sys.argv[5]) if len(sys.argv) > 5 else None
    n_drop = int(round(dropout * n))
    result: dict = {"n": n, "P": P, "dropout": dropout}

    class RandomUpdate(NumPyClient):
        def __init__(self, pid: int) -> None:
            self.pid = pid

        def fit(self, parameters, config):
            rng = np.random.default_rng(self.pid)
            return [parameters[0] + rng.normal(0, 0.01, P).astype(np.float32)], 10, {}

    def client_fn(context: Context):
        return RandomUpdate(int(context.node_config["partition-id"])).to_client()

    def drop_mod(msg, ctxt, call_next):
        cfg = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        pid = int(ctxt.node_config["partition-id"])
        if cfg is not None and cfg.get(Key.STAGE) == Stage.COLLECT_MASKED_VECTORS and pid < n_drop:
            raise RuntimeError(f"node {pid} drops in the collect-masked-vectors stage")
        return call_next(msg, ctxt)

    client_app = ClientApp(client_fn=client_fn, mods=[drop_mod, secaggplus_mod])

    class TimedSecAggPlus(SecAggPlusWorkflow):
        def __call__(self, grid, context):
            t0 = time.perf_counter()
            super().__call__(grid, context)
            result["round_seconds"] = time.perf_counter() - t0

    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=n, min_available_clients=n,
                          initial_parameters=ndarrays_to_parameters([np.zeros(P, np.float32)]))
        ctx = LegacyContext(context=context, config=ServerConfig(num_rounds=1), strategy=strategy)
        k = shares if shares is not None else min(n, 2 * int(np.ceil(np.log2(n))) + 1)
        t = threshold if threshold is not None else k // 2 + 1
        workflow = DefaultWorkflow(fit_workflow=TimedSecAggPlus(num_shares=k, reconstruction_threshold=t))
        workflow(grid, ctx)
        params = ctx.state.array_records.get("parameters")
        agg = params.to_numpy_ndarrays()[0] if params is not None else None
        result["aggregate_ok"] = bool(agg is not None and agg.shape == (P,) and np.isfinite(agg).all()
                                      and 0 < float(np.abs(agg).max()) < 1)
        result["num_shares"], result["threshold"] = k, t

    logging.getLogger("flwr").setLevel(logging.WARNING)
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=n,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   # keep Ray on loopback, without its dashboard
                                   "init_args": {"_node_ip_address": "127.0.0.1", "include_dashboard": False}})
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
