"""Adversarial tests: attackers speaking the wire protocol against real coordinators, clients and peers.

Each test that measures an attack reports its figures with :func:`record`; ``benchmarks/adversarial.py`` runs these
tests with larger settings and turns the records into the attack table."""

from __future__ import annotations

import json
import os


def record(attack: str, accuracy: float | None = None, clean: float | None = None,
           rss_growth_models: float | None = None, **details) -> None:
    """Append one attack's figures (final accuracy, the clean control's, memory growth in models above the control)
    as a JSON line to the file named by ``FEDOPT_ATTACK_REPORT``; nothing when it is unset."""
    path = os.environ.get("FEDOPT_ATTACK_REPORT")
    if not path:
        return
    row = {"attack": attack, "accuracy": accuracy, "clean": clean, "rss_growth_models": rss_growth_models, **details}
    with open(path, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")
