"""``fedopt keys generate DIR``: write a key folder (:func:`fedopt.keys.generate_keys`) and say what goes where."""

from __future__ import annotations

import argparse
import sys

from ..keys import describe_keys, existing_keys, generate_keys

__all__ = ["configure", "run"]


def configure(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    g = sub.add_parser("generate", help="write a coordinator key pair and N client key pairs into DIR")
    g.add_argument("dir", help="directory to write the keys into (created if missing)")
    g.add_argument("--clients", type=int, default=8, help="number of client key pairs (default 8)")
    g.add_argument("--force", action="store_true",
                   help="replace the keys DIR already holds (every client then needs its new files)")


def run(args: argparse.Namespace) -> int:
    old = existing_keys(args.dir) if args.force else []
    d = generate_keys(args.dir, args.clients, force=args.force)
    if old:
        print(f"replaced the keys in {d} ({describe_keys(old)}): clients holding the old files can no longer "
              f"connect; give each its new ones", file=sys.stderr)
    print(f"wrote CurveZMQ keys to {d}:\n"
          f"  coordinator: {d / 'coordinator.key_secret'} (keep here), {d / 'coordinator.key'} (give to clients)\n"
          f"  allow-list:  {d / 'allowed'}/ ({args.clients} client public keys the coordinator admits)\n"
          f"  clients:     {d / 'clients'}/client-NNN.key_secret (give each client only its own)\n"
          f"  secagg:      {d / 'identities'}/ (identity public keys: give to every client), "
          f"{d / 'clients'}/client-NNN.identity_secret (give each client only its own)\n"
          f"keep {d} out of version control (it holds secret keys)")
    return 0
