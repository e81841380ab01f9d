"""Gossip without processes: the mixing state, topologies, the wire messages, and two peers' socket threads in-process."""

from __future__ import annotations

import threading

import pytest
import torch
import zmq

from clients.gossip import topology
from clients.gossip.choco import ChocoGossip
from clients.gossip.peer import PeerSockets, Request
from clients.gossip.state import Bounds, ModelState, consensus_distance
from fedopt import bus, wire
from fedopt.compress import parse_compressor
from fedopt.errors import ConfigError, WireError


#: bounds loose enough for the hand-made vectors of the math tests (zeros, far-apart constants)
LOOSE = Bounds(norm_factor=1e9, dist_factor=1e9, clip_factor=1e9, max_weight_ratio=1e9)


# ---- ModelState -----------------------------------------------------------------------------------------------------
def test_push_pull_weights_by_samples_and_conserves_the_weighted_sum():
    a = ModelState(torch.tensor([0.0, 0.0]), num_samples=30, bounds=LOOSE)
    b = ModelState(torch.tensor([4.0, 8.0]), num_samples=10, bounds=LOOSE)
    before_b, vb, out_b = b.accept_push(a.vec.clone(), a.num_samples, a.version)  # b mixes a in
    out_a = a.complete_push(torch.tensor([0.0, 0.0]), 0, before_b, b.num_samples, vb)  # a mixes b's old model
    expected = torch.tensor([1.0, 2.0])  # (30*0 + 10*x_b) / 40
    assert torch.allclose(a.vec, expected) and torch.allclose(b.vec, expected)
    assert out_a.action == out_b.action == "mixed" and a.version == b.version == 0  # a mix adds no training


def test_progress_made_during_an_exchange_is_kept():
    a = ModelState(torch.zeros(3), num_samples=1, bounds=LOOSE)
    sent, v = a.snapshot()
    a.add_progress(torch.ones(3))  # the trainer finished an epoch while the exchange was in flight
    a.complete_push(sent, v, torch.full((3,), 2.0), 1, 0)
    assert torch.allclose(a.vec, torch.full((3,), 2.0))  # pair average (1.0) + own progress (1.0)


def test_a_stale_model_never_overwrites_a_newer_one():
    new = ModelState(torch.ones(2), 10, version=50, max_lag=5, bounds=LOOSE)
    old = ModelState(torch.zeros(2), 10, version=3, max_lag=5, bounds=LOOSE)
    before, v, outcome = new.accept_push(old.vec.clone(), 10, old.version)
    assert outcome.action == "kept" and torch.equal(new.vec, torch.ones(2)) and new.version == 50
    # the stale side mixes the newer model in (no wholesale adoption) and its clock moves by at most max_jump
    assert old.complete_push(old.vec.clone(), 3, before, 10, v).action == "mixed"
    assert torch.allclose(old.vec, torch.full((2,), 0.5)) and old.version == 3 + LOOSE.max_jump
    assert new.adopt(torch.zeros(2), 49).action == "kept" and torch.equal(new.vec, torch.ones(2))
    assert new.adopt(torch.zeros(2), 51).action == "mixed" and new.version == 51


@pytest.mark.parametrize("bad,reason", [(torch.zeros(3), "does not match"), (torch.zeros(2, 2), "does not match"),
                                        (torch.tensor([1.0, float("nan"), 0, 0]), "non-finite"),
                                        (torch.tensor([float("inf"), 0, 0, 0]), "non-finite")])
def test_models_of_the_wrong_shape_or_with_nan_are_refused(bad, reason):
    with pytest.raises(WireError, match=reason):
        ModelState(torch.zeros(4), 1).check(bad)


def test_random_pairwise_gossip_reaches_consensus_on_the_weighted_mean():
    g = torch.Generator().manual_seed(0)
    states = [ModelState(torch.randn(5, generator=g), int(n), bounds=LOOSE) for n in torch.randint(1, 50, (8,), generator=g)]
    target = sum(s.vec * s.num_samples for s in states) / sum(s.num_samples for s in states)
    d0 = consensus_distance([s.vec for s in states])
    for _ in range(400):
        i, j = torch.randperm(8, generator=g)[:2].tolist()
        before, v, _ = states[j].accept_push(states[i].vec.clone(), states[i].num_samples, states[i].version)
        states[i].complete_push(states[i].vec.clone(), states[i].version, before, states[j].num_samples, v)
    assert consensus_distance([s.vec for s in states]) < 1e-4 * d0
    assert all(torch.allclose(s.vec, target, atol=1e-4) for s in states)


# ---- topologies -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", topology.TOPOLOGIES)
@pytest.mark.parametrize("n", [2, 5, 8, 16])
def test_metropolis_hastings_weights_are_symmetric_and_doubly_stochastic(kind, n):
    w = topology.mixing_matrix(n, kind)
    assert torch.allclose(w, w.T) and torch.allclose(w.sum(1), torch.ones(n, dtype=torch.float64))
    assert (w >= 0).all() and topology.second_eigenvalue(w) < 1 - 1e-9  # connected: it mixes


def test_topology_shapes_and_mixing_rates():
    assert topology.neighbours(0, 8, "ring") == [1, 7]
    assert topology.neighbours(0, 8, "exponential") == [1, 2, 4, 6, 7]
    assert topology.second_eigenvalue(topology.mixing_matrix(8, "complete")) < 1e-9  # one round averages exactly
    lam = {k: topology.second_eigenvalue(topology.mixing_matrix(16, k)) for k in ("ring", "exponential")}
    assert lam["exponential"] < lam["ring"]
    with pytest.raises(ValueError, match="topology"):
        topology.neighbours(0, 4, "star")


def test_mix_row_gives_a_missing_neighbours_weight_to_itself():
    row = topology.mh_weights(0, 4, "ring")  # neighbours 1 and 3, weight 1/3 each
    own, got = torch.zeros(2), {1: torch.full((2,), 3.0)}
    assert torch.allclose(topology.mix_row(0, own, got, row), torch.full((2,), 1.0))


# ---- wire -----------------------------------------------------------------------------------------------------------
def test_gossip_messages_round_trip():
    m = wire.GossipPush(round=3, xid=7, version=9, num_samples=12, addr="tcp://127.0.0.1:1", peers={"ipc://x": 1},
                        model=torch.arange(4.0))
    back = wire.decode(wire.encode(m))
    assert isinstance(back, wire.GossipPush) and back.peers == {"ipc://x": 1} and torch.equal(back.model, m.model)
    assert wire.decode(wire.encode(wire.GossipFetch(xid=1, kind="exchange"))).kind == "exchange"


# ---- two socket threads in this process -----------------------------------------------------------------------------
def _pair(ctx, tmp_path, **kw):
    urls = [f"ipc://{tmp_path}/p{i}.sock" for i in range(2)]
    states = [ModelState(torch.full((6,), float(i)), 10, bounds=LOOSE) for i in range(2)]
    peers = [PeerSockets(ctx, urls[i], urls[i], states[i], bus.Security(), bus.Security(), [urls[1 - i]], linger=0.3,
                         **kw) for i in range(2)]
    threads = [threading.Thread(target=p.serve, daemon=True) for p in peers]
    for t in threads:
        t.start()
    return peers, states, threads


def _stop(peers, threads):
    for p in peers:
        p.submit(Request("done", budget=1))
        p.release()
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads)


@pytest.mark.timeout(60)
def test_two_peers_that_pick_each_other_at_once_do_not_deadlock(zmq_context, tmp_path):
    peers, states, threads = _pair(zmq_context, tmp_path, exchange_timeout=5.0, max_tries=100)
    try:
        for _ in range(5):
            results = [None, None]

            def ask(i):
                # a fresh budget (two slots: an exchange the other peer finished after this round opened counts here)
                peers[i].submit(Request("round", 1, budget=1.0, slots=2))
                results[i] = peers[i].submit(Request("push", 1, budget=5.0))

            askers = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
            for t in askers:
                t.start()
            for t in askers:
                t.join(timeout=20)
            assert all(r is not None and r["status"] == "ok" for r in results), results
        assert torch.allclose(states[0].vec, states[1].vec)  # every exchange completed on both sides
        assert torch.allclose(states[0].vec, torch.full((6,), 0.5))  # and the mean was kept
        peers[1].submit(Request("round", 2, budget=1.0))
        fetched = peers[0].submit(Request("fetch", budget=5.0))
        assert fetched["status"] == "ok" and fetched["action"] == "kept"  # same version: nothing to adopt
    finally:
        _stop(peers, threads)
    # each of the 5 rounds, each peer's push completed one exchange it started (a "busy" answer is retried)
    assert [p.stats["exchanges"] for p in peers] == [5, 5], [p.stats for p in peers]
    assert sum(p.stats["timeouts"] for p in peers) == 0


@pytest.mark.timeout(60)
def test_an_exchange_with_a_dead_peer_times_out_and_drops_it(zmq_context, tmp_path):
    state = ModelState(torch.zeros(3), 1)
    ghost = f"ipc://{tmp_path}/ghost.sock"
    p = PeerSockets(zmq_context, f"ipc://{tmp_path}/me.sock", f"ipc://{tmp_path}/me.sock", state, bus.Security(),
                    bus.Security(), [ghost], exchange_timeout=0.5, linger=0.1)
    t = threading.Thread(target=p.serve, daemon=True)
    t.start()
    try:
        got = p.submit(Request("push", 1, budget=1.5))
        assert got["status"] in ("timeout", "alone") and p.stats["timeouts"] >= 1 and ghost not in p.live_peers()
    finally:
        p.submit(Request("done", budget=1))
        p.release()
        t.join(timeout=10)


def test_cli_rejects_bad_gossip_options(monkeypatch):
    from fedopt.cli import Parser
    from fedopt.cli.gossip import configure, gossip_config
    from fedopt.errors import ConfigError

    monkeypatch.delenv("FEDOPT_INTERFACE", raising=False)
    parser = Parser(prog="fedopt gossip")
    configure(parser)
    for argv, msg in ((["--shard", "3", "--num-shards", "2"], "out of range"),
                      (["--shard", "0", "--num-shards", "2", "--peers", "http://x"], "must start with"),
                      (["--shard", "0", "--num-shards", "2", "--topology", "ring"], "every member"),
                      (["--shard", "0", "--num-shards", "2", "--discover"], "--interface")):
        with pytest.raises(ConfigError, match=msg):
            gossip_config(parser.parse_args(["--bind", "ipc:///tmp/x.sock", *argv]))


@pytest.mark.timeout(60)
def test_dpsgd_round_mixes_with_metropolis_hastings_weights(zmq_context, tmp_path):
    n = 4
    urls = [f"ipc://{tmp_path}/d{i}.sock" for i in range(n)]
    states = [ModelState(torch.full((3,), float(i * i)), 10, bounds=LOOSE) for i in range(n)]
    peers = [PeerSockets(zmq_context, urls[i], urls[i], states[i], bus.Security(), bus.Security(), [],
                         members=urls, topology="ring", linger=0.3) for i in range(n)]
    threads = [threading.Thread(target=p.serve, daemon=True) for p in peers]
    for t in threads:
        t.start()
    x = torch.stack([s.vec.clone() for s in states]).to(torch.float64)
    try:
        results = [None] * n
        askers = [threading.Thread(target=lambda i=i: results.__setitem__(i, peers[i].submit(Request("sync", 1, 10))))
                  for i in range(n)]
        for t in askers:
            t.start()
        for t in askers:
            t.join(timeout=30)
        assert all(r["status"] == "ok" and r["received"] == 2 for r in results), results
    finally:
        _stop(peers, threads)
    expected = topology.mixing_matrix(n, "ring") @ x
    assert all(torch.allclose(states[i].vec.to(torch.float64), expected[i]) for i in range(n))


def test_the_round_budget_counts_model_messages_and_reserves_the_peers_own_slots(zmq_context, tmp_path):
    p = PeerSockets(zmq_context, f"ipc://{tmp_path}/b.sock", f"ipc://{tmp_path}/b.sock",
                    ModelState(torch.zeros(3), 1), bus.Security(), bus.Security(), [])
    try:
        p.requests.put(Request("round", 1, slots=2))  # budget 2 slots x 4 models = 8
        p._take_requests()
        assert not p._busy("exchange")  # 0 used + 2 for this exchange + 4 kept for its own two slots
        p.stats["models"] += 3  # e.g. one accepted exchange and a stray push, counted at the sockets
        assert p._busy("exchange") and not p._busy("fetch")  # 3 + 2 + 4 > 8; a newcomer's pull is always answered
        p.training = False
        assert not p._busy("exchange")  # a lingering peer helps whoever is still mixing
    finally:
        p.close()


def test_a_push_that_comes_after_its_reservation_expired_still_completes_the_exchange(zmq_context, tmp_path):
    state = ModelState(torch.zeros(4), 10, bounds=LOOSE)
    p = PeerSockets(zmq_context, f"ipc://{tmp_path}/l.sock", f"ipc://{tmp_path}/l.sock", state, bus.Security(),
                    bus.Security(), [], exchange_timeout=0.01)
    try:
        vec, version = state.snapshot()
        p.reserved = {"xid": 7, "addr": "ipc://a", "before": vec, "version": version, "deadline": 0.0}
        p._timers()  # the PUSH is late: the reservation is released...
        assert p.reserved is None and ("ipc://a", 7) in p.released
        late = wire.GossipPush(xid=7, version=0, num_samples=10, addr="ipc://a", model=torch.full((4,), 2.0))
        p._on_inbound(p.router, b"id", late)  # ...and mixed when it comes, against the snapshot that was sent
        assert torch.allclose(state.vec, torch.ones(4)) and p.stats["late"] == 1 and not p.released
        with pytest.raises(WireError, match="matches no exchange"):
            p._on_inbound(p.router, b"id", late)  # only once
    finally:
        p.close()


# ---- zero trust: bounds on what one neighbour's claims can do -----------------------------------------------------
def _trained(n=4, step=1.0, samples=10, **kw):
    """A state whose recent motion is known: two local rounds of ``step`` each."""
    s = ModelState(torch.full((n,), 5.0), samples, **kw)
    s.add_progress(torch.full((n,), step / n ** 0.5), 1)
    s.add_progress(torch.zeros(n), 2)
    return s


def test_a_huge_version_moves_the_clock_by_a_bounded_jump_and_a_huge_model_is_refused():
    s = _trained()
    with pytest.raises(WireError, match="over 3x"):
        s.complete_push(s.vec.clone(), 2, torch.full((4,), 1e30), 10, 10**9)
    assert s.version == 2 and torch.isfinite(s.vec).all()
    near = s.vec + 0.1
    s.complete_push(s.vec.clone(), 2, near, 10, 10**9)  # a plausible model claiming a huge version
    assert s.version == 2 + s.bounds.max_jump  # mixed, but the clock moved by max_jump only


def test_a_received_model_moves_this_peer_no_further_than_the_recent_motion():
    s = _trained(step=1.0)  # recent motion: one step of length 1
    own = s.vec.clone()
    far = own + torch.tensor([3.0, 0, 0, 0])  # 3 away: inside the refusal bound, outside the clip
    s.complete_push(own, 2, far, 10, 2)
    moved = float(torch.linalg.vector_norm(s.vec - own))
    assert moved <= s.weight(10) * s.bounds.clip_factor * 1.0 + 1e-6
    with pytest.raises(WireError, match="recent motion"):
        s.complete_push(s.vec.clone(), 2, -s.vec, 10, 2)  # far outside (norm fine): refused, nothing changes


def test_sample_counts_are_clamped_relative_to_this_peers_own():
    s = ModelState(torch.zeros(2), 10)
    assert s.weight(10) == 0.5
    assert s.weight(2**62) == pytest.approx(40 / 50)  # at most max_weight_ratio x own
    assert s.weight(-5) == pytest.approx(1 / 11)  # at least one sample


def test_a_fetch_takes_the_coordinate_median_so_one_hostile_reply_moves_nothing():
    s = ModelState(torch.full((3,), 1.0), 10)
    honest = [torch.tensor([2.0, 2.0, 2.0]), torch.tensor([2.2, 1.8, 2.0])]
    hostile = torch.tensor([-2.9, 2.9, -2.9])  # within the norm bound, far from both
    out = s.adopt_agreed([honest[0], hostile, honest[1]], [5, 10**9, 6])
    assert out.action == "adopted" and s.version == 6  # the lower median version: the liar's is ignored
    assert torch.allclose(s.vec, torch.tensor([2.0, 2.0, 2.0]))
    with pytest.raises(WireError, match="over 3x"):
        s.adopt_agreed([honest[0], torch.full((3,), 1e6)], [7, 7])


def test_membership_takes_few_rumours_per_message_and_prefers_met_peers():
    from clients.gossip.members import RUMOURS_PER_MESSAGE, Membership

    m = Membership("ipc://me", ["ipc://seed"], peer_timeout=60, max_known=16, explore=0.0)
    m.heard("ipc://seed")  # reached directly: met
    assert m.rumours({f"ipc://dead-{i}": 1 for i in range(20_000)}) == RUMOURS_PER_MESSAGE
    assert len(m.live) == 1 + RUMOURS_PER_MESSAGE
    assert {m.pick() for _ in range(50)} == {"ipc://seed"}  # an unverified address is not dialled preferentially
    for k in range(10):
        m.rumours({f"ipc://more-{k}-{i}": 1 for i in range(8)})
    assert len(m.live) <= 16 and "ipc://seed" in m.live  # bounded; a met peer is never evicted
    assert m.rumours("not a map") == 0 and m.rumours({"http://x": 1, 7: 1}) == 0


def test_an_address_is_bound_to_the_key_that_announced_it_first():
    from clients.gossip.members import AddressKeys

    book = AddressKeys(per_key=2, max_keys=2)
    assert book.claim("ipc://a", "K1") and book.claim("ipc://a", "K1")
    assert not book.claim("ipc://a", "K2")  # held by K1
    assert book.claim("ipc://a", None)  # no key (no authentication): nothing to check
    assert book.claim("ipc://b", "K1") and book.claim("ipc://c", "K1")  # K1's third address releases its first
    assert book.claim("ipc://a", "K2")
    assert not book.claim("ipc://z", "K3")  # the book is full of keys


def test_dpsgd_keeps_only_the_current_and_next_round_from_graph_neighbours(zmq_context, tmp_path):
    urls = [f"ipc://{tmp_path}/m{i}.sock" for i in range(4)]
    p = PeerSockets(zmq_context, urls[0], urls[0], ModelState(torch.zeros(3), 10, bounds=LOOSE), bus.Security(),
                    bus.Security(), [], members=urls, topology="ring")
    try:
        for r in range(1, 200):
            try:
                p._on_sync_push(urls[1], r, torch.ones(3))
            except WireError:
                pass
        for r in (1, 2, 1, 2):
            p._on_sync_push(urls[3], r, torch.ones(3))
        assert sorted(p.inbox) == [1, 2] and all(len(v) == 2 for v in p.inbox.values())  # 2 rounds x 2 neighbours
        with pytest.raises(WireError, match="not a neighbour"):
            p._on_sync_push(urls[2], 1, torch.ones(3))  # a member, but not adjacent on the ring
    finally:
        p.close()


@pytest.mark.timeout(60)
def test_a_message_whose_decoding_or_handling_fails_is_dropped_and_the_loop_goes_on(zmq_context, tmp_path,
                                                                                     monkeypatch):
    peers, states, threads = _pair(zmq_context, tmp_path, exchange_timeout=2.0)
    real = wire.decode

    def decode(frames, limits=wire.Limits()):  # the fault: a decoder bug that raises something else than WireError
        msg = real(frames, limits)
        if isinstance(msg, wire.GossipFetch) and msg.addr == "ipc://boom":
            raise TypeError("not a WireError")
        return msg

    monkeypatch.setattr(wire, "decode", decode)  # the module every endpoint decodes with
    raw = zmq_context.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(f"ipc://{tmp_path}/p0.sock")
    try:
        for _ in range(3):
            raw.send_multipart(wire.encode(wire.GossipFetch(xid=1, addr="ipc://boom", kind="fetch")))
        peers[1].submit(Request("round", 1, budget=1.0, slots=2))
        got = peers[1].submit(Request("push", 1, budget=5.0))  # peer 0 still answers its neighbour
        assert got["status"] == "ok", got
        # a valid fetch behind the three on the same connection: its answer (a model, or busy) means peer 0 has
        # handled all three, since one connection delivers in order and one thread handles them
        raw.send_multipart(wire.encode(wire.GossipFetch(xid=2, addr=f"ipc://{tmp_path}/raw.sock", kind="fetch")))
        assert raw.poll(30_000), "peer 0 never answered the valid fetch"
        answer = wire.decode(raw.recv_multipart())
        assert isinstance(answer, (wire.GossipReply, wire.GossipBusy)) and answer.xid == 2, answer
        assert peers[0].stats["refused"] == 3 and threads[0].is_alive()
    finally:
        raw.close(0)
        _stop(peers, threads)


@pytest.mark.timeout(60)
def test_a_dead_socket_thread_answers_stopped_at_once_and_the_context_still_ends(zmq_context, tmp_path,
                                                                                 monkeypatch):
    p = PeerSockets(zmq_context, f"ipc://{tmp_path}/x.sock", f"ipc://{tmp_path}/x.sock",
                    ModelState(torch.zeros(3), 1), bus.Security(), bus.Security(), [])
    monkeypatch.setattr(p, "_timers", lambda: (_ for _ in ()).throw(RuntimeError("a bug in the loop")))
    failed = []
    t = threading.Thread(target=lambda: failed.append(pytest.raises(RuntimeError, p.serve)), daemon=True)
    t.start()
    t.join(timeout=10)
    assert failed and not t.is_alive() and p.stopped.is_set()
    assert p.submit(Request("push", 1, budget=30.0)) == {"status": "stopped"}  # no 40 s wait
    p.release()


def _choco_ring(spec: str, gamma: float, n: int = 6, size: int = 300):
    nodes = [ChocoGossip(parse_compressor(spec), size, i, topology.neighbours(i, n, "ring"), gamma) for i in range(n)]
    g = torch.Generator().manual_seed(0)
    return nodes, [torch.randn(size, generator=g) for _ in range(n)]


def _choco_round(nodes, x, t, lost=()):
    """One synchronous CHOCO round on the ring; ``lost``: (receiver, sender) pairs whose difference never arrives."""
    n = len(nodes)
    qs = [c.outgoing(x[i], t * n + i) for i, c in enumerate(nodes)]
    heard = [set() for _ in nodes]
    for i, c in enumerate(nodes):
        for j in c.followed():
            if (i, j) not in lost:
                c.receive(j, qs[j])
                heard[i].add(j)
    return [c.mix(x[i], topology.mh_weights(i, n, "ring"), heard[i]) for i, c in enumerate(nodes)]


def test_choco_gossip_copies_stay_in_step_the_mean_is_kept_and_consensus_is_reached():
    # Prepare: 6 nodes on a ring, 4-bit differences, gamma 1
    nodes, x = _choco_ring("q4", 1.0)
    mean0, spread0 = sum(x) / 6, max(float((v - sum(x) / 6).norm()) for v in x)
    # Execute
    for t in range(40):
        x = _choco_round(nodes, x, t)
    # Assert: every node's copy of j is j's own, bit for bit; the mean is kept; the spread shrank 1000-fold
    assert all(torch.equal(c.hat[j], nodes[j].hat[j]) for c in nodes for j in c.followed())
    assert torch.allclose(sum(x) / 6, mean0, atol=1e-4)
    assert max(float((v - mean0).norm()) for v in x) < 1e-3 * spread0
    # with exact messages and gamma 1 a round is D-PSGD's mix, x_i <- sum_j W_ij x_j
    exact, y = _choco_ring("fp16", 1.0, size=8)
    y = [v.half().float() for v in y]  # exactly representable: fp16 differences from zero copies are lossless
    mixed = _choco_round(exact, y, 0)
    want = [topology.mix_row(i, y[i], {j: y[j] for j in topology.neighbours(i, 6, "ring")},
                             topology.mh_weights(i, 6, "ring")) for i in range(6)]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(mixed, want))


def test_choco_gossip_drops_a_neighbour_whose_difference_was_lost():
    nodes, x = _choco_ring("q8", 1.0)
    x = _choco_round(nodes, x, 0, lost={(0, 1)})
    assert nodes[0].followed() == [5] and nodes[1].followed() == [0, 2]  # node 1 still hears node 0
    with pytest.raises(WireError, match="no CHOCO copy of node 1"):
        nodes[0].receive(1, nodes[1].outgoing(x[1], 7))
    with pytest.raises(WireError, match="elements, the model has 300"):  # a difference of another size: dropped
        nodes[0].receive(5, parse_compressor("q8").compress(torch.ones(299), 0))
    assert nodes[0].followed() == []
    with pytest.raises(WireError, match="would have norm inf"):  # a copy must stay finite and bounded
        nodes[2].receive(3, parse_compressor("q8").compress(torch.full((300,), float("inf")), 0))
    with pytest.raises(WireError, match="over 1"):
        nodes[2].receive(1, nodes[1].outgoing(x[1], 8), max_norm=1.0)
    assert nodes[2].followed() == []
    with pytest.raises(ConfigError, match="--choco-gamma"):
        ChocoGossip(parse_compressor("q8"), 3, 0, [1], 1.5)
