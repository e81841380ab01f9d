"""Leak checks behind ``tests/conftest.py``'s fixtures (not a test module).

A ZeroMQ context terminates only once every socket made from it is closed, so a context that cannot terminate
within a deadline has leaked a socket: the check names the sockets still open, closes them (so the rest of the
session is unaffected) and reports the leak. Child processes still running after a test are leaked processes: the
check waits a grace period for them to exit, names them, kills them and reports them. Both report; the caller fails.

``owned_context()`` is the same check for a context that lives outside one test (a module-scoped run), where the
``zmq_context`` fixture cannot be used.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
import threading
import time
from collections.abc import Iterator

import psutil
import zmq

__all__ = ["TERM_DEADLINE", "CHILD_GRACE", "terminate", "owned_context", "children", "reap_leaked",
           "become_subreaper"]

#: seconds a context has to terminate once the test is over (a closed socket with LINGER 0 frees at once)
TERM_DEADLINE = 10.0
#: seconds a child process still running after a test has to exit on its own before it counts as leaked
CHILD_GRACE = 5.0

# multiprocessing's resource tracker and fork server are shared by every pool of the session by design: they
# outlive any one test and are not leaks
_SHARED_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


def _describe_socket(s: zmq.Socket) -> str:
    try:
        kind = zmq.SocketType(s.type).name
    except (ValueError, zmq.ZMQError):
        kind = "socket"
    try:
        endpoint = s.getsockopt_string(zmq.LAST_ENDPOINT) or "no endpoint"
    except zmq.ZMQError:
        endpoint = "?"
    return f"{kind} {endpoint}"


def terminate(ctx: zmq.Context, deadline: float = TERM_DEADLINE) -> list[str]:
    """Terminate ``ctx`` within ``deadline`` seconds. Returns ``[]`` when it terminated in time, else one line per
    socket still open at the deadline; those sockets are then closed (LINGER 0) so that the context terminates.

    Raises ``AssertionError`` when the context cannot terminate even with every socket closed (a closed socket
    whose LINGER is -1 holding unsent messages)."""
    done = threading.Event()

    def term() -> None:
        ctx.term()
        done.set()

    threading.Thread(target=term, name="zmq-term", daemon=True).start()
    if done.wait(deadline):
        return []
    leaked = [s for s in list(ctx._sockets) if not s.closed]
    lines = [_describe_socket(s) for s in leaked]
    for s in leaked:  # the test is over: its sockets' owner threads are done with them
        s.close(linger=0)
    if not done.wait(deadline):
        raise AssertionError(f"a ZeroMQ context could not terminate within {deadline}s although every socket is "
                             "closed: a socket closed with LINGER -1 still holds unsent messages")
    return lines or ["(none open: a socket closed with LINGER -1 held unsent messages until the deadline)"]


def leak_message(lines: list[str], deadline: float) -> str:
    return (f"the ZeroMQ context could not terminate within {deadline}s: {len(lines)} socket(s) left open "
            f"(closed now): " + "; ".join(lines))


@contextlib.contextmanager
def owned_context(deadline: float = TERM_DEADLINE) -> Iterator[zmq.Context]:
    """A context for a block of code; leaving the block terminates it and raises ``AssertionError`` if a socket
    was left open. When the block itself raised, its error is what propagates (the leak is cleaned up quietly)."""
    ctx = zmq.Context()
    ok = False
    try:
        yield ctx
        ok = True
    finally:
        lines = terminate(ctx, deadline)
        if lines and ok:
            raise AssertionError(leak_message(lines, deadline))


def become_subreaper() -> bool:
    """Make this process adopt its orphaned descendants (Linux ``PR_SET_CHILD_SUBREAPER``), so a grandchild whose
    parent died (a client of a killed coordinator, a worker of a killed launcher) is still seen as this process's
    child and can be caught leaking. Returns whether it took effect."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0  # 36 = PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _shared_helper(p: psutil.Process) -> bool:
    try:
        cmd = " ".join(p.cmdline())
    except psutil.Error:
        return False
    return any(h in cmd for h in _SHARED_HELPERS)


def children() -> dict[int, psutil.Process]:
    """This process's running descendants (zombies excluded: they have exited), by pid."""
    out = {}
    for p in psutil.Process().children(recursive=True):
        if _running(p):
            out[p.pid] = p
    return out


def _describe_process(p: psutil.Process) -> str:
    try:
        cmd = " ".join(p.cmdline())
    except psutil.Error:
        cmd = "?"
    return f"pid {p.pid}: {cmd[:200]}"


def reap_leaked(before: dict[int, psutil.Process], grace: float = CHILD_GRACE) -> list[str]:
    """The descendants started since ``before`` that are still running after ``grace`` seconds, one line each;
    they are killed (SIGKILL) before this returns. Shared helpers (multiprocessing's resource tracker) are exempt."""
    new = [p for pid, p in children().items() if pid not in before and not _shared_helper(p)]
    end = time.monotonic() + grace
    while any(_running(p) for p in new) and time.monotonic() < end:
        time.sleep(0.05)
    alive = [p for p in new if _running(p)]
    lines = [_describe_process(p) for p in alive]
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    return lines
