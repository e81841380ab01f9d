"""Split long vector passes (mask expansion, encoding) across threads.

AES-CTR in ``cryptography`` and numpy's ufuncs release the GIL while they run, so the keystream
expansion that dominates secure aggregation scales with threads: each thread takes one contiguous
range of the vector and starts its ciphers at that range's counter block, which gives exactly the
bytes a single pass would (CTR mode is seekable). Ranges are aligned to the 16-byte AES block.

The thread count defaults to the CPUs this process may run on (at most 8); ``FEDOPT_SECAGG_THREADS``
or :func:`set_threads` overrides it (1 disables threading). Vectors shorter than
``MIN_BYTES_PER_THREAD`` per thread run in the calling thread.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from fedopt.errors import SecAggError

__all__ = ["MIN_BYTES_PER_THREAD", "for_ranges", "set_threads", "threads"]

#: below this many bytes per thread, a hand-off costs more than the second core saves
MIN_BYTES_PER_THREAD = 1 << 20
_MAX_DEFAULT = 8
_AES_BLOCK = 16
_PREFIX = "fedopt-secagg"

_lock = threading.Lock()
_threads: int | None = None
_pool: ThreadPoolExecutor | None = None
_pool_key: tuple[int, int] | None = None  # (pid, workers) the pool was made for


def _default_threads() -> int:
    env = os.environ.get("FEDOPT_SECAGG_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            raise SecAggError(f"FEDOPT_SECAGG_THREADS must be an integer >= 1, got {env!r}") from None
        if n < 1:
            raise SecAggError(f"FEDOPT_SECAGG_THREADS must be an integer >= 1, got {env!r}")
        return n
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(_MAX_DEFAULT, cpus))


def threads() -> int:
    """Threads a long pass may use."""
    return _threads if _threads is not None else _default_threads()


def set_threads(n: int | None) -> None:
    """Use ``n`` threads for long passes (None: back to the default)."""
    global _threads
    if n is not None and (not isinstance(n, int) or n < 1):
        raise SecAggError(f"secure-aggregation threads must be an integer >= 1, got {n!r}")
    _threads = n


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool, _pool_key
    key = (os.getpid(), workers)  # a forked child inherits a pool whose threads do not exist
    with _lock:
        if _pool_key != key:
            if _pool is not None and _pool_key[0] == key[0]:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=_PREFIX)
            _pool_key = key
        return _pool


def for_ranges(fn: Callable[[int, int], None], size: int, itemsize: int) -> None:
    """Call ``fn(start, stop)`` over disjoint ranges covering ``range(size)`` of ``itemsize``-byte words.

    Every ``start`` is a multiple of 16 bytes (so a CTR stream for the range begins at block
    ``start * itemsize // 16``). The calling thread takes the first range; an exception in any range
    is raised here after all ranges finished.
    """
    align = max(1, _AES_BLOCK // itemsize)
    parts = min(threads(), max(1, size * itemsize // MIN_BYTES_PER_THREAD))
    if parts <= 1 or threading.current_thread().name.startswith(_PREFIX):  # a pool thread never waits on the pool
        fn(0, size)
        return
    step = -(-size // parts)
    step += -step % align
    bounds = [(a, min(a + step, size)) for a in range(0, size, step)]
    pool = _executor(threads() - 1)
    futures = [pool.submit(fn, a, b) for a, b in bounds[1:]]
    try:
        fn(*bounds[0])
    finally:
        errors = [f.exception() for f in futures]
    for e in errors:
        if e is not None:
            raise e

