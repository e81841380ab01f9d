"""The leak fixtures of tests/conftest.py, run on tests that leak on purpose (in a child pytest, via ``pytester``)."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent

# every inner test either leaks for certain (a socket never closed, a child that sleeps ten minutes) or cleans up
# before it ends, so no outcome below depends on timing; the short deadline and grace only make the failures quick
LEAKY = '''
import subprocess, sys, time

import psutil
import pytest
import zmq


@pytest.fixture
def zmq_term_deadline():
    return 0.5


@pytest.fixture
def child_grace():
    return 0.5


def test_leaks_a_socket(zmq_context):
    s = zmq_context.socket(zmq.DEALER)
    s.bind("tcp://127.0.0.1:*")
    LEAKED.append(s)  # still referenced: only the fixture can close it


def test_closes_its_socket(zmq_context):
    s = zmq_context.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.bind("tcp://127.0.0.1:*")
    s.close()


def test_leaks_a_child():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    (PIDS / "leaked").write_text(str(p.pid))


def test_waits_for_its_child():
    subprocess.run([sys.executable, "-c", "pass"], check=True)


def test_a_child_that_exited_unreaped_is_not_running():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    while psutil.Process(p.pid).status() != psutil.STATUS_ZOMBIE:  # exited; nobody called wait()
        time.sleep(0.01)


LEAKED = []
'''


@pytest.mark.timeout(120)
def test_the_fixtures_fail_a_leaked_socket_and_a_leaked_child_and_clean_both_up(pytester):
    pytester.makepyfile(_leaks=(HERE / "_leaks.py").read_text())
    pytester.makeconftest((HERE / "conftest.py").read_text())
    pids = pytester.mkdir("pids")
    pytester.makepyfile(test_leaky=f"from pathlib import Path\nPIDS = Path({str(pids)!r})\n" + LEAKY)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA")
    out = result.stdout.str()
    result.assert_outcomes(passed=5, errors=2)
    # pytest names each failing teardown "ERROR at teardown of <test>"
    assert "ERROR at teardown of test_leaks_a_socket" in out
    assert "ERROR at teardown of test_leaks_a_child" in out
    assert "could not terminate within 0.5s: 1 socket(s) left open (closed now): DEALER tcp://127.0.0.1:" in out
    leaked = int((pids / "leaked").read_text())
    assert f"1 child process(es) still running 0.5s after the test (killed now): pid {leaked}:" in out
    import psutil
    assert not psutil.pid_exists(leaked) or psutil.Process(leaked).status() == psutil.STATUS_ZOMBIE
