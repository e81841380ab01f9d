"""Option groups that several commands share, and reading them back into config fields.

Every command that runs rounds (``simulate``, ``coordinator``) takes the same round and bus options, and every command
that takes ``KEY=VALUE`` options (``--task-option``) parses them with :func:`parse_kv`. These helpers only declare
options on a parser a command hands them and read back the namespace argparse made.
"""

from __future__ import annotations

import argparse
from typing import Any, Sequence

__all__ = ["parse_kv", "add_round_options", "add_bus_options", "round_overrides", "config_out"]


def parse_kv(text: str) -> tuple[str, Any]:
    """``key=value`` with the value read as an int, float, bool or string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    for conv in (int, float):
        try:
            return key.replace("-", "_"), conv(value)
        except ValueError:
            pass
    if value.lower() in ("true", "false"):
        return key.replace("-", "_"), value.lower() == "true"
    return key.replace("-", "_"), value


def add_round_options(p: argparse.ArgumentParser) -> None:
    """Options shared by `simulate` and `coordinator`; every default is None so the config file can supply it."""
    S = argparse.SUPPRESS
    g = p.add_argument_group("task and data")
    g.add_argument("--config", default=None, help="TOML file with any of these options (flags override it)")
    g.add_argument("--task", default=S, help="built-in task (digits, synthetic, synthetic-iid) or package.module:attr")
    g.add_argument("--task-option", dest="task_options", action="append", type=parse_kv, default=S,
                   metavar="KEY=VALUE", help="option for the task's factory, e.g. alpha=1 (repeatable)")
    g.add_argument("--clients", type=int, default=S, help="number of clients / data shards (default 10)")
    g.add_argument("--partition", default=S, choices=("iid", "dirichlet", "natural"), help="default dirichlet")
    g.add_argument("--alpha", type=float, default=S, help="Dirichlet concentration (default 0.5)")
    g = p.add_argument_group("rounds")
    g.add_argument("--rounds", type=int, default=S, help="default 50")
    g.add_argument("--clients-per-round", type=int, default=S, help="default: all clients")
    g.add_argument("--fraction", type=float, default=S, help="clients per round as a fraction in (0, 1]")
    g.add_argument("--client-sampling", choices=("fixed", "poisson"), default=S,
                   help="fixed: exactly the clients per round (default); poisson: each client independently with "
                        "probability clients-per-round / clients")
    g.add_argument("--local-epochs", type=int, default=S, help="default 5")
    g.add_argument("--batch-size", type=int, default=S, help="default 16")
    g.add_argument("--lr", type=float, default=S, help="client learning rate (default 0.1)")
    g.add_argument("--momentum", type=float, default=S, help="client SGD momentum (default 0)")
    g.add_argument("--optimizer", choices=("sgd", "adam", "adamw"), default=S,
                   help="client optimizer, fresh each round (default sgd)")
    g.add_argument("--weight-decay", type=float, default=S, help="client weight decay (default 0)")
    g.add_argument("--clip-norm", type=float, default=S, help="clip each local step's gradient to this L2 norm")
    g.add_argument("--lr-schedule", choices=("constant", "cosine", "step"), default=S,
                   help="client learning rate over rounds (default constant); the server sends each round's rate")
    g.add_argument("--lr-min", type=float, default=S, help="cosine: the rate it decays towards (default 0)")
    g.add_argument("--lr-step", type=int, default=S, help="step: rounds between decays (default 10)")
    g.add_argument("--lr-gamma", type=float, default=S, help="step: factor of each decay (default 0.1)")
    g.add_argument("--mu", type=float, default=S, help="FedProx proximal term (default 0 = FedAvg)")
    g.add_argument("--dp-sgd", action="store_true", default=S,
                   help="sample-level DP-SGD in each client through Opacus (pip install 'fedopt[opacus]'); each "
                        "client's epsilon in its metrics")
    g.add_argument("--dp-sgd-noise", type=float, default=S, help="--dp-sgd: noise multiplier (default 1.0)")
    g.add_argument("--dp-sgd-clip", type=float, default=S, help="--dp-sgd: per-example gradient L2 bound (default 1.0)")
    g.add_argument("--stragglers", type=float, default=S, help="fraction of selected clients doing partial work")
    g.add_argument("--straggler-policy", choices=("auto", "keep", "drop"), default=S,
                   help="auto: keep partial work when mu > 0 (FedProx), drop it otherwise (FedAvg)")
    g.add_argument("--eval-every", type=int, default=S, help="evaluate every k rounds (default 1)")
    g = p.add_argument_group("aggregation")
    g.add_argument("--aggregator", default=S, help="fedavg | weighted | mean | median | trimmed_mean | norm_bound | "
                                                  "centered_clip | krum | multi_krum | bulyan | geomed | cosine_filter | "
                                                  "dnc | secagg")
    g.add_argument("--aggregator-option", dest="aggregator_options", action="append", type=parse_kv, default=S,
                   metavar="KEY=VALUE", help="option for the aggregator (repeatable); bucketing=S puts a rule that "
                   "keeps every update (median ... geomed) behind buckets of S (Karimireddy et al. 2022)")
    g.add_argument("--server-opt", default=S, help="fedavg | fedavgm | fedadam | fedyogi | fedadagrad")
    g.add_argument("--server-lr", type=float, default=S, help="server learning rate")
    g.add_argument("--server-option", dest="server_options", action="append", type=parse_kv, default=S,
                   metavar="KEY=VALUE", help="server optimizer option: momentum, beta1, beta2, tau (repeatable)")
    g.add_argument("--secagg-neighbours", type=int, default=S,
                   help="secagg: neighbours per client k (default 2*ceil(log2 n); n-1 = complete graph)")
    g.add_argument("--secagg-threshold", type=int, default=S,
                   help="secagg: Shamir threshold t, k/2 < t <= k (default floor(k/2)+1)")
    g.add_argument("--clip", type=float, default=S, help="secagg: L2 clip norm of each update (default 10)")
    g.add_argument("--bits", type=int, default=S, help="secagg: quantisation bits per coordinate (default 16)")
    g.add_argument("--buffers", choices=("average", "local"), default=S,
                   help="float buffers such as BatchNorm statistics: averaged or kept on each client")
    g = p.add_argument_group("differential privacy (client-level DP-FedAvg; pip install 'fedopt[dp]')")
    g.add_argument("--dp", choices=("central", "distributed"), default=S,
                   help="central: clip each update and add Gaussian noise to the round's sum on the coordinator; "
                        "distributed: each client adds Skellam noise to its update inside secagg")
    g.add_argument("--dp-min-clients", type=int, default=S,
                   help="--dp distributed: each client adds the noise share of this many survivors; a round with "
                        "fewer aborts (default: expected cohort minus two standard deviations)")
    g.add_argument("--noise-multiplier", type=float, default=S,
                   help="z: noise std over the clip norm (default: calibrated to --target-epsilon)")
    g.add_argument("--dp-clip-norm", type=float, default=S,
                   help="C: each update's L2 bound (with --adaptive-clip, the initial clip; default 0.1)")
    g.add_argument("--adaptive-clip", type=float, default=S, metavar="QUANTILE",
                   help="the clip tracks this quantile of the update norms, e.g. 0.5 (Andrew et al.; default off)")
    g.add_argument("--target-epsilon", type=float, default=S,
                   help="the budget: calibrates z for --rounds when z is not given, else stops the run before it "
                        "would be exceeded")
    g.add_argument("--delta", type=float, default=S, help="delta of the (epsilon, delta) guarantee (default 1/N^1.1)")
    g.add_argument("--accountant", choices=("rdp", "pld"), default=S,
                   help="privacy accountant from dp_accounting (default rdp; pld needs --client-sampling poisson)")
    g.add_argument("--noise-source", choices=("seeded", "secure"), default=S,
                   help="seeded: reproducible by --seed (default, simulations); secure: os.urandom (production)")
    g = p.add_argument_group("compression (fedopt.compress)")
    g.add_argument("--compress", default=S, metavar="SPEC",
                   help="compress client updates: topk:F | randk:F | q8|q4|q2[:BLOCK] | fp16, a sparsifier and a "
                        "value codec joined by + (e.g. topk:0.01+q8)")
    g.add_argument("--no-error-feedback", dest="error_feedback", action="store_false", default=S,
                   help="send each compressed update on its own (default: clients keep the residual of biased "
                        "compressors, top-k and random-k)")
    g.add_argument("--choco-gamma", type=float, default=S,
                   help="--mode gossip --topology with --compress: CHOCO-Gossip's consensus step in (0, 1] (default 1)")
    g.add_argument("--compress-down", default=S, metavar="q8[:BLOCK]",
                   help="send the model to clients as 8-bit blockwise codes (q8; also q4, q2, fp16); the "
                        "coordinator keeps it exact")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=S)
    g.add_argument("--device", default=S, help="auto | cpu | cuda (auto = CUDA when present)")
    g.add_argument("--out", default=S, help="output directory (default runs/latest)")
    g.add_argument("--progress", choices=("auto", "bar", "lines", "off"), default=S)
    g.add_argument("--tracker", choices=("tensorboard", "mlflow"), default=S,
                   help="also log every round to TensorBoard (OUT/tensorboard) or MLflow (optional extras)")
    g.add_argument("--eval-clients", action="store_true", default=S,
                   help="also record per-class accuracy and each client's accuracy on its own data")
    g.add_argument("--no-plot", dest="plot", action="store_false", default=S,
                   help="skip OUT/accuracy.png (saves about a second of matplotlib start-up)")


def add_bus_options(p: argparse.ArgumentParser) -> None:
    """Options of runs over the ZeroMQ bus (`coordinator`, and `simulate --transport ipc|tcp`)."""
    S = argparse.SUPPRESS
    g = p.add_argument_group("bus")
    g.add_argument("--deadline", type=float, default=S, help="seconds a round waits for updates (default 60)")
    g.add_argument("--min-clients", type=int, default=S, help="quorum to close a round at its deadline (default 1)")
    g.add_argument("--heartbeat", type=float, default=S, help="heartbeat interval in seconds (default 1)")
    g.add_argument("--join-timeout", type=float, default=S,
                   help="seconds to wait for every client before starting a round with fewer (default 30)")
    g.add_argument("--wire-dtype", choices=("float32", "bfloat16", "float16"), default=S,
                   help="precision of models and deltas on the wire (default float32)")
    g.add_argument("--upload-slots", type=int, default=S, help="updates pulled at once (default 2)")
    g.add_argument("--fed-eval-every", type=int, default=S,
                   help="federated evaluation on the clients' test splits every k rounds (default 0 = never)")
    g = p.add_argument_group("bounds (no client's claim sets its influence unchecked)")
    g.add_argument("--max-samples", type=int, default=S,
                   help="cap on one client's aggregation weight, its announced sample count (default 1000000)")
    g.add_argument("--max-share", type=float, default=S,
                   help="cap on one client's share of a round's total weight (default 0.25, at least 1.5/selected)")
    g.add_argument("--norm-factor", type=float, default=S,
                   help="reject updates with an L2 norm over this x the last round's median (default 4, 0 = off)")
    g.add_argument("--max-update-norm", type=float, default=S, help="absolute L2 bound on one update (default none)")
    g.add_argument("--max-clients", type=int, default=S,
                   help="registrations held at once (default 2 x clients + 16)")


def round_overrides(args: argparse.Namespace, skip: Sequence[str] = ("config",)) -> dict:
    """The RunConfig fields the user gave on the command line (key=value lists become dicts)."""
    out = {}
    for k, v in vars(args).items():
        if k in skip or k == "overwrite" or k.startswith("_"):
            continue
        out[k] = dict(v) if isinstance(v, list) else v
    return out


def config_out(args: argparse.Namespace) -> str:
    """The run folder of a command built from add_round_options: --out, else the config file's, else the default."""
    from ..config import RunConfig, load_toml

    if "out" in vars(args):
        return args.out
    from_file = load_toml(args.config).get("out") if getattr(args, "config", None) else None
    return str(from_file) if from_file is not None else RunConfig.out


def add_buffered_options(p: argparse.ArgumentParser) -> None:
    """Buffered asynchronous rounds (`simulate` and `coordinator`)."""
    S = argparse.SUPPRESS
    g = p.add_argument_group("buffered asynchronous rounds (FedBuff; FedAsync is --buffer-size 1)")
    g.add_argument("--buffer-size", type=int, default=S,
                   help="K: updates per server step; turns on asynchronous rounds (--rounds counts server steps)")
    g.add_argument("--concurrency", type=int, default=S, help="C: clients training at once (default: per round)")
    g.add_argument("--dispatch-threshold", type=int, default=S,
                   help="O: start clients once this many slots are free (default 1; C = K = O = clients: sync)")
    g.add_argument("--max-staleness", type=int, default=S,
                   help="H: drop updates more than H versions old, counted in stale_dropped (default: keep all)")
    g.add_argument("--staleness", default=S,
                   help="weight of a tau-stale update: polynomial[:A] (default, A=0.5) | sqrt | hinge[:A,B] | constant")
