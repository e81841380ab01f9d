"""Suite-wide fixtures: a temporary data cache, a ZeroMQ context that fails its test on a leaked socket, and a check
that fails a test whose child processes outlive it (both in ``tests/_leaks.py``)."""

from __future__ import annotations

import os

import pytest
import zmq

import _leaks

pytest_plugins = ["pytester"]  # tests/test_conftest.py checks these fixtures on tests that leak on purpose


def pytest_configure(config):
    # orphaned grandchildren (the clients of a killed coordinator) are adopted by this process, so the process
    # check below sees them instead of losing them to init
    _leaks.become_subreaper()


@pytest.fixture(autouse=True, scope="session")
def _data_cache_in_a_temporary_folder(tmp_path_factory):
    """The per-machine data cache (fedopt.data.cache) of this test session lives in a temporary folder, not in the
    user's ~/.cache; child processes inherit it through the environment."""
    before = os.environ.get("FEDOPT_CACHE_DIR")
    os.environ["FEDOPT_CACHE_DIR"] = str(tmp_path_factory.mktemp("fedopt-cache"))
    yield
    if before is None:
        os.environ.pop("FEDOPT_CACHE_DIR", None)
    else:
        os.environ["FEDOPT_CACHE_DIR"] = before


@pytest.fixture
def zmq_term_deadline() -> float:
    """Seconds ``zmq_context`` gives its context to terminate after the test (override to shorten)."""
    return _leaks.TERM_DEADLINE


@pytest.fixture
def zmq_context(zmq_term_deadline):
    """A ZeroMQ context owned by the test. The test closes every socket it makes (LINGER 0 where messages may be
    unsent); afterwards the context must terminate within ``zmq_term_deadline`` seconds, or the test fails naming
    the sockets left open (which are then closed, so later tests are unaffected)."""
    ctx = zmq.Context()
    yield ctx
    lines = _leaks.terminate(ctx, zmq_term_deadline)
    if lines:
        pytest.fail(_leaks.leak_message(lines, zmq_term_deadline), pytrace=False)


@pytest.fixture
def child_grace() -> float:
    """Seconds a child process still running after a test has to exit before it counts as leaked."""
    return _leaks.CHILD_GRACE


@pytest.fixture(autouse=True)
def _no_leaked_processes(child_grace):
    """Every test: descendant processes started during the test must have exited when it ends (after a grace
    period); any still running fail the test by name and are killed."""
    before = _leaks.children()
    yield
    lines = _leaks.reap_leaked(before, child_grace)
    if lines:
        pytest.fail(f"{len(lines)} child process(es) still running {child_grace}s after the test (killed now): "
                    + "; ".join(lines), pytrace=False)
