"""The ``fedopt`` command. Thin: parse, build objects, call; argv is seen only here.

This package is the one composition root: the only part of :mod:`fedopt` that imports :mod:`coordinator` or
:mod:`clients` (an import-linter contract in ``pyproject.toml`` holds it to that). Each subcommand is a module of this
package providing ``configure(parser)`` and ``run(args) -> int``, imported only when chosen, so ``fedopt --help``
answers without importing torch; option groups that several commands share are in :mod:`fedopt.cli.options`. A
command reads its flags (and ``--config`` file) into its runtime's frozen config dataclass, which validates itself,
then calls the runtime with it: no runtime sees an ``argparse.Namespace``. Every deliberate error is one line on
stderr; exit codes are 0 success, 2 bad usage or invalid input, 1 a run that failed.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any, Sequence

from ..errors import FedoptError

__all__ = ["main", "Parser", "SUBCOMMANDS", "RUN_FOLDER_COMMANDS"]

# name -> (module implementing configure/run, one-line description)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "simulate": ("fedopt.cli.simulate", "run many clients on this machine (in-process, worker pool, or real processes)"),
    "coordinator": ("fedopt.cli.coordinator", "run a coordinator that federated clients connect to"),
    "client": ("fedopt.cli.client", "run one federated client on its private shard"),
    "aggregator": ("fedopt.cli.aggregator", "run an edge aggregator: clients join it, it joins the coordinator"),
    "gossip": ("fedopt.cli.gossip", "run one gossip peer (no coordinator)"),
    "allreduce": ("fedopt.cli.allreduce", "run datacenter workers on torch.distributed (DDP / local SGD)"),
    "keys": ("fedopt.cli.keys", "make CurveZMQ key pairs: fedopt keys generate DIR"),
    "plot": ("fedopt.cli.plot", "compare runs on one figure: fedopt plot RUN [RUN ...] --out FILE.png"),
}
#: commands that write a run folder (OUT/metrics.jsonl, model, checkpoint): each takes --overwrite, and its folder is
#: claimed (fedopt.metrics.claim_run_dir) before the command starts. A module may define ``run_folder(args) ->
#: (out, resume) | None`` when its folder is not simply ``args.out`` (None: this process does not claim it; resume
#: None: the command cannot resume).
RUN_FOLDER_COMMANDS = ("simulate", "coordinator", "gossip", "allreduce")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


# ---- entry point ------------------------------------------------------------------------------------------------------
def _top_help() -> str:
    width = max(map(len, SUBCOMMANDS))
    rows = "\n".join(f"  {n:<{width}}  {d}" for n, (_, d) in SUBCOMMANDS.items())
    return f"usage: fedopt COMMAND [options]\n\ncommands:\n{rows}\n\n`fedopt COMMAND --help` lists a command's options."


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_top_help())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from .. import __version__

        print(f"fedopt {__version__}")
        return 0
    name = argv[0]
    if name not in SUBCOMMANDS:
        sys.stderr.write(f"fedopt: error: unknown command {name!r} (choose from {', '.join(SUBCOMMANDS)})\n")
        return 2
    module_name, desc = SUBCOMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        sys.stderr.write(f"fedopt {name}: error: this command is unavailable: {e}\n")
        return 1
    parser = Parser(prog=f"fedopt {name}", description=desc)
    module.configure(parser)
    if name in RUN_FOLDER_COMMANDS:
        parser.add_argument("--overwrite", action="store_true",
                            help="replace the results of an earlier run in the output folder (without this or "
                                 "--resume, a folder holding results is refused)")
    args = parser.parse_args(argv[1:])
    try:
        if name in RUN_FOLDER_COMMANDS:
            _claim_run_folder(module, args)
        return int(module.run(args) or 0)
    except FedoptError as e:
        sys.stderr.write(f"fedopt {name}: error: {e}\n")
        return e.exit_code
    except KeyboardInterrupt:
        sys.stderr.write(f"fedopt {name}: interrupted\n")
        return 130
    except (ValueError, FileNotFoundError) as e:
        # a bad value that slipped past validation still gets one line, not a traceback wall
        sys.stderr.write(f"fedopt {name}: error: {e}\n")
        return 2


def _claim_run_folder(module: Any, args: argparse.Namespace) -> None:
    from ..metrics import claim_run_dir

    where = module.run_folder(args) if hasattr(module, "run_folder") else (args.out, getattr(args, "resume", False))
    if where is not None:
        claim_run_dir(where[0], resume=where[1], overwrite=args.overwrite)


if __name__ == "__main__":
    raise SystemExit(main())
