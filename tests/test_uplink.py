"""Uplink's session bookkeeping with a fake clock: failover to the next endpoint, backoff, giving up (no sockets)."""

from __future__ import annotations

import logging

import pytest

from fedopt import bus, wire
from fedopt.errors import FedoptError
from fedopt.uplink import Uplink


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_a_lost_session_moves_to_the_next_endpoint_backs_off_and_gives_up():
    clock = Clock()
    up = Uplink(None, ["ipc://a", "ipc://b"], bus.Security(), wire.Hello(client="c"), 1.0, give_up=10.0,
                who="client c", log=logging.getLogger("test"), clock=clock)
    assert up.url == "ipc://a" and up.sockets == []
    assert up.lost() == 0.25 and up.url == "ipc://b"  # failover: the next listed endpoint
    assert up.lost() == 0.5 and up.url == "ipc://a"  # round robin, backing off
    up.welcome(wire.Welcome(config={"heartbeat": 0.2}))
    assert up.heartbeat == 0.2 and up.timeout() == pytest.approx(0.2)  # the coordinator's interval from then on
    clock.t += 9.0
    assert up.lost() == 0.25 and up.url == "ipc://b"  # a welcomed session resets the backoff and the give-up clock
    clock.t += 9.0
    assert up.lost() == 0.5
    clock.t += 1.5
    with pytest.raises(FedoptError, match="ipc://a, ipc://b for 10s: giving up"):
        up.lost()
