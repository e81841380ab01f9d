"""The wire schema's field checks: one check per header field name, shared by every message type that has the field
(:mod:`fedopt.wire` holds the message table and the codec). Pure functions; each raises WireError naming the field."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable

from ..errors import WireError

if TYPE_CHECKING:
    from .messages import Limits, Message

__all__ = ["CHECKS", "FETCH_KINDS", "int_in", "is_int", "show", "text"]

#: what a GOSSIP_FETCH may ask for
FETCH_KINDS = ("fetch", "exchange", "final")


def show(v: Any, n: int = 40) -> str:
    """A hostile value, shortened for an error message (a 64 KiB string must not become a 64 KiB log line)."""
    r = repr(v)
    return r if len(r) <= n else f"{r[:n]}...({len(r)} chars)"


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def int_in(what: str, v: Any, lo: int, hi: int) -> None:
    """``lo <= v <= hi`` for a Python int (bool is not an int here)."""
    if not is_int(v) or not lo <= v <= hi:
        raise WireError(f"{what} must be an int in [{lo}, {hi}], not {show(v)}")


def text(what: str, v: Any, most: int) -> None:
    if not isinstance(v, str) or len(v) > most or not v.isprintable():
        raise WireError(f"{what} must be a printable str of at most {most} characters, not {show(v)}")


def _counter(cls: type[Message], name: str, v: Any, lim: Limits) -> None:
    int_in(f"{cls.TYPE}: {name}", v, 0, lim.max_int - 1)


def _samples(cls: type[Message], name: str, v: Any, lim: Limits) -> None:
    int_in(f"{cls.TYPE}: {name}", v, cls.MIN_SAMPLES, lim.max_samples)


def _count(cls: type[Message], name: str, v: Any, lim: Limits) -> None:
    int_in(f"{cls.TYPE}: {name}", v, 0, lim.max_samples)


def _name(cls: type[Message], name: str, v: Any, lim: Limits) -> None:
    text(f"{cls.TYPE}: {name}", v, lim.max_reason if name == "reason" else lim.max_name)


def _fetch_kind(cls: type[Message], name: str, v: Any, lim: Limits) -> None:
    if not isinstance(v, str) or v not in FETCH_KINDS:
        raise WireError(f"{cls.TYPE}: {name} must be one of {', '.join(FETCH_KINDS)}, not {show(v)}")


def _fraction(cls: type[Message], name: str, v: Any, lim: Limits) -> None:
    if not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1):
        raise WireError(f"{cls.TYPE}: {name} must be a number in (0, 1], not {show(v)}")


def _map(what: str, v: Any, most: int, lim: Limits) -> None:
    if not isinstance(v, dict) or len(v) > most:
        raise WireError(f"{what} must be a map of at most {most} entries, not {show(v)}")
    for k in v:
        text(f"{what} key", k, lim.max_name)


def _metrics(cls: type[Message], name: str, v: Any, lim: Limits) -> None:
    _map(f"{cls.TYPE}: {name}", v, lim.max_metrics, lim)
    for k, x in v.items():
        # bool is an int; an int is kept below 2**53 so that it converts to a float exactly
        if not (math.isfinite(x) if isinstance(x, float) else isinstance(x, int) and -lim.max_int < x < lim.max_int):
            raise WireError(f"{cls.TYPE}: {name}[{show(k)}] must be a finite number, not {show(x)}")


def _peers(cls: type[Message], name: str, v: Any, lim: Limits) -> None:
    _map(f"{cls.TYPE}: {name}", v, lim.max_peers, lim)
    for k, x in v.items():
        int_in(f"{cls.TYPE}: {name}[{show(k)}]", x, 0, lim.max_int - 1)


def _tree(cls: type[Message], name: str, v: Any, lim: Limits) -> None:
    """Plain data a few levels deep: maps with str keys, lists, and scalars; bounded in depth and item count."""
    what = f"{cls.TYPE}: {name}"
    if not isinstance(v, dict):
        raise WireError(f"{what} must be a map, not {type(v).__name__}")
    budget = [lim.max_tree_items]

    def walk(x: Any, depth: int) -> None:
        budget[0] -= 1
        if budget[0] < 0:
            raise WireError(f"{what} holds more than {lim.max_tree_items} items")
        if isinstance(x, (dict, list)):
            if depth >= lim.max_depth:
                raise WireError(f"{what} is nested more than {lim.max_depth} deep")
            if isinstance(x, dict) and not all(isinstance(k, str) for k in x):
                raise WireError(f"{what} has a key that is not a str")  # msgpack limits its length
            for y in x.values() if isinstance(x, dict) else x:
                walk(y, depth + 1)
        elif not (x is None or isinstance(x, (str, bool, int, float))):
            raise WireError(f"{what} holds a {type(x).__name__}, which the wire does not carry")

    walk(v, 0)


#: the check of each field name; every non-tensor field of every message type must appear here (checked at import)
CHECKS: dict[str, Callable[[type[Message], str, Any, Limits], None]] = {
    "round": _counter, "xid": _counter, "version": _counter, "cohort": _counter, "scale": _fraction,
    "num_samples": _samples, "clients": _count,
    "sender": _name, "client": _name, "device": _name, "addr": _name, "reason": _name, "kind": _fetch_kind,
    "metrics": _metrics, "peers": _peers, "spec": _tree, "config": _tree,
}  # and UPDATE's "encoding", checked by fedopt.wire.compressed (messages.py adds it)


