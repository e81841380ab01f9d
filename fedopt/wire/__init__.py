"""The bus's wire format: message types (:mod:`.messages`, with the full protocol description), their encoding
(:mod:`.codec`) and the bound every header field is checked against (:mod:`.schema`). No zmq, no I/O."""

from .codec import decode, encode
from .messages import (FETCH_KINDS, MESSAGE_TYPES, VERSION, WIRE_DTYPES, Bye, Cohort, Evaluate, GossipBusy,
                       GossipFetch, GossipPush, GossipReply, Heartbeat, Hello, Limits, Message, Offer, Pass, Pull,
                       Ready, Result, SecAgg, Train, UpdateMsg, Welcome)

__all__ = [
    'VERSION', 'Limits', 'Message', 'Hello', 'Welcome', 'Ready', 'Offer', 'Pull', 'Cohort', 'Train', 'UpdateMsg',
    'Evaluate', 'Result', 'Heartbeat', 'Bye', 'Pass', 'GossipPush', 'GossipReply', 'GossipBusy', 'GossipFetch',
    'SecAgg', 'MESSAGE_TYPES', 'WIRE_DTYPES', 'FETCH_KINDS', 'encode', 'decode'
]
