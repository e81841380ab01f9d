"""Liveness, Ticker and Backoff with a fake clock: no sockets, no sleeping."""

from __future__ import annotations

import pytest

from fedopt.liveness import Backoff, Liveness, Ticker


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_peer_dies_after_three_silent_intervals():
    clock = Clock()
    live = Liveness(1.0, clock=clock)
    live.heard("a")
    live.heard("b")
    clock.t += 2.9
    live.heard("b")
    assert live.expire() == [] and live.alive("a")
    clock.t += 0.1
    assert not live.alive("a")
    assert live.expire() == ["a"]
    assert "a" not in live and "b" in live
    clock.t += 3.0
    assert live.expire() == ["b"] and len(live) == 0


def test_any_message_resets_the_count_and_forget_removes():
    clock = Clock()
    live = Liveness(0.5, misses=2, clock=clock)
    live.heard("x")
    for _ in range(10):
        clock.t += 0.9
        live.heard("x")
    assert live.expire() == [] and live.silent_for("x") == 0
    live.forget("x")
    assert not live.alive("x") and live.silent_for("x") is None


def test_ticker_fires_once_per_interval_without_bursts():
    clock = Clock()
    tick = Ticker(1.0, clock=clock)
    assert not tick.due() and tick.remaining() == 1.0
    clock.t += 5.0  # five intervals missed: one heartbeat, not five
    assert tick.due() and not tick.due()
    clock.t += 0.5
    assert tick.remaining() == pytest.approx(0.5)


def test_backoff_doubles_up_to_the_cap_and_resets():
    b = Backoff(0.1, cap=0.5)
    assert [b.next() for _ in range(5)] == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])
    b.reset()
    assert b.next() == 0.1


@pytest.mark.parametrize("make", [lambda: Liveness(0), lambda: Liveness(1, misses=0), lambda: Ticker(-1),
                                  lambda: Backoff(2, cap=1), lambda: Backoff(1, factor=0.5)])
def test_invalid_settings_are_errors(make):
    with pytest.raises(ValueError):
        make()
