"""Upload credit for masked inputs on the bus: OFFER -> PULL, at most ``upload_slots`` masked vectors in flight."""

from __future__ import annotations

from types import SimpleNamespace

from fedopt import wire
from coordinator.secure_bus import BusTransport


class _Coordinator:
    """The parts of a Coordinator a BusTransport uses: peers, a socket that records what it sends, a clock."""

    def __init__(self):
        self.sent: list[tuple[str, wire.Message]] = []
        self.unreachable: set[str] = set()
        self.registry = SimpleNamespace(peer_of=lambda c: None if c in self.unreachable else c.encode())
        self.ep = SimpleNamespace(send=self._send)
        self.now = 0.0

    def _send(self, msg, to):
        self.sent.append((to.decode(), msg))
        return True

    def clock(self):
        return self.now

    def _pump(self, timeout):
        self.now += timeout

    def _keepalive(self):
        pass

    def pulls(self):
        return [c for c, m in self.sent if isinstance(m, wire.Pull)]


def test_masked_inputs_are_pulled_two_at_a_time():
    ids = [f"c{i}" for i in range(6)]
    coord = _Coordinator()
    tr = BusTransport(coord, 4, ids, slots=2)
    for c in ids[:5]:
        assert tr.offer(c, 4) is None
    assert coord.pulls() == ["c0", "c1"]  # the rest wait for credit
    assert all(m.round == 4 for _, m in coord.sent)
    assert tr.offer("c0", 4) is not None  # a second offer
    assert tr.offer("c5", 3) is not None  # another round
    assert tr.offer("stranger", 4) is not None  # not a participant
    tr.deliver("c1", wire.SecAgg(round=4, parts=[b"masked"]))
    assert coord.pulls() == ["c0", "c1"]  # credit returns when the message is taken, not when it is queued
    assert tr.recv(1.0) == ("c1", [b"masked"])
    assert coord.pulls() == ["c0", "c1", "c2"]
    tr.lost("c0")  # died holding a slot: its slot goes to the next in line
    assert coord.pulls() == ["c0", "c1", "c2", "c3"] and "c0" in tr.gone
    coord.unreachable.add("c4")
    tr.deliver("c2", wire.SecAgg(round=4, parts=[b"y"]))
    tr.recv(1.0)  # c4's PULL cannot be sent: c4 is gone and nothing else is queued
    assert "c4" in tr.gone and coord.pulls()[-1] == "c3"
    assert tr.recv(0.1) is None  # nothing in the inbox: times out


def test_training_loss_comes_with_the_offer():
    ids = ["a", "b", "c", "d"]
    tr = BusTransport(_Coordinator(), 2, ids, slots=1)
    tr.offer("a", 2, 10, {"loss": 1.0, "steps": 3})
    tr.offer("b", 2, 30, {"loss": 2.0})
    tr.offer("c", 2, 5, {"loss": float("nan")})  # not finite: ignored
    tr.offer("d", 2, 5, {"loss": "high"})  # not a number: ignored
    assert tr.train_loss(["a", "b", "c", "d"]) == (1.0 * 10 + 2.0 * 30) / 40
    assert tr.train_loss(["b"]) == 2.0  # only survivors count
    assert tr.train_loss(["c"]) is None


def test_an_offer_that_never_uploads_loses_its_credit_once():
    """A hostile client OFFERs and never uploads: its slot comes back after credit_s, and it cannot OFFER again."""
    coord = _Coordinator()
    tr = BusTransport(coord, 1, ["bad", "a", "b"], slots=1, credit_s=5.0)
    assert tr.offer("bad", 1) is None and tr.offer("a", 1) is None
    assert coord.pulls() == ["bad"]
    assert tr.recv(0.1) is None and coord.pulls() == ["bad"]  # credit not yet expired (the fake clock moved 0.1 s)
    coord.now += 5.0
    assert tr.recv(0.1) is None
    assert coord.pulls() == ["bad", "a"]  # the slot went to the next in line
    assert tr.offer("bad", 1) is not None  # one grant per client per round
    assert tr.deliver("bad", wire.SecAgg(round=1, parts=[b"body", b"vector"])) is not None  # no credit: refused
    assert tr.deliver("a", wire.SecAgg(round=1, parts=[b"body", b"vector"])) is None  # a holds credit


def test_the_inbox_takes_only_participants_and_a_few_messages_each():
    tr = BusTransport(_Coordinator(), 1, ["a", "b"], slots=1)
    assert tr.deliver("stranger", wire.SecAgg(round=1, parts=[b"x"])) is not None
    for _ in range(4):
        assert tr.deliver("a", wire.SecAgg(round=1, parts=[b"x"])) is None
    assert tr.deliver("a", wire.SecAgg(round=1, parts=[b"x"])) is not None  # a replay flood is cut off
    assert tr.recv(1.0) == ("a", [b"x"])
    assert tr.deliver("a", wire.SecAgg(round=1, parts=[b"x"])) is None  # room again once one is taken


def test_offered_sample_counts_are_capped_for_the_loss_weighting():
    tr = BusTransport(_Coordinator(), 2, ["a", "b"], slots=1, max_weight=100)
    tr.offer("a", 2, 2**40, {"loss": 9.0})
    tr.offer("b", 2, 100, {"loss": 1.0})
    assert tr.train_loss(["a", "b"]) == 5.0  # 2**40 weighs as the cap, 100
