"""The ``secagg`` aggregator: weighted FedAvg under SecAgg+ masking, through RoundServer and the simulation."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from fedopt.aggregators import SecureAggregator, Update, make_aggregator
from fedopt.config import RunConfig, build_config
from fedopt.errors import ConfigError
from fedopt.optimizers import make_server_optimizer
from fedopt.params import ParamSpec
from fedopt.engine import RoundServer
from fedopt.task import TrainConfig

P = 500


def _server(agg, per_round):
    spec = ParamSpec.from_module(torch.nn.Linear(P - 1, 1))
    assert spec.size == P
    return RoundServer(spec, torch.zeros(P), agg, make_server_optimizer("fedavg"), TrainConfig(),
                       per_round=per_round, seed=3)


def _updates(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {c: Update(c, torch.randn(P, generator=g) * 0.05, n) for c, n in sizes.items()}


def _weighted_mean(updates):
    w = torch.tensor([float(u.num_samples) for u in updates], dtype=torch.float64)
    x = torch.stack([u.delta.double() for u in updates])
    return (w[:, None] * x).sum(0) / w.sum()


@pytest.mark.parametrize("n", [3, 12])
def test_round_server_secagg_matches_plain_weighted_mean_within_the_quantisation_bound(n):
    sizes = {f"c{i:02d}": 20 + 7 * i for i in range(n)}
    agg = SecureAggregator(clip=10.0, bits=16)
    srv = _server(agg, n)
    srv.plan(1, sizes)
    srv.begin(1)  # participants come from the plan
    ups = _updates(sizes)
    for u in ups.values():
        assert srv.offer(u) is None
    out = srv.close()
    want = _weighted_mean(list(ups.values()))
    step = 10.0 / (2 ** 15 - 1)
    # weighted decode bound: the weighted mean of per-client rounding errors, under one step (fedopt.secagg.quantize)
    bound = step
    assert out.applied and out.count == n and out.weight == sum(sizes.values())
    assert float((srv.global_vec.double() - want).abs().max()) <= bound
    assert agg.last_round["survivors"] == n and agg.last_round["aborted"] is None


def test_clients_that_never_report_are_dropouts_and_the_survivors_mean_comes_out():
    sizes = {f"c{i:02d}": 30 for i in range(10)}
    agg = SecureAggregator(clip=10.0, bits=16, weighting="uniform")
    srv = _server(agg, 10)
    srv.plan(1, sizes)
    srv.begin(1)
    ups = _updates(sizes, seed=1)
    survivors = [c for c in sorted(sizes) if c not in ("c03", "c07")]
    for c in survivors:
        assert srv.offer(ups[c]) is None
    out = srv.close()
    want = torch.stack([ups[c].delta for c in survivors]).double().mean(0)
    assert out.applied and out.count == 8 and agg.last_round["dropped"] == 2
    assert float((srv.global_vec.double() - want).abs().max()) <= 10.0 / (2 ** 15 - 1)


def test_too_few_survivors_abort_the_round_with_a_logged_error_and_the_next_round_runs(caplog):
    sizes = {f"c{i}": 10 for i in range(5)}  # complete graph, k = 4, t = 3
    agg = SecureAggregator(clip=1.0, bits=12)
    srv = _server(agg, 5)
    ups = _updates(sizes, seed=2)
    srv.plan(1, sizes)
    srv.begin(1)
    for c in ("c0", "c1"):  # only 2 of 5 mask their input: below t = 3
        assert srv.offer(ups[c]) is None
    with caplog.at_level(logging.ERROR, logger="fedopt.secagg"):
        out = srv.close()
    assert not out.applied and torch.equal(srv.global_vec, torch.zeros(P))
    assert any("aborted" in r.getMessage() and "threshold" in r.getMessage() for r in caplog.records)
    srv.plan(2, sizes)
    srv.begin(2)
    for u in ups.values():
        assert srv.offer(u) is None
    assert srv.close().applied and not torch.equal(srv.global_vec, torch.zeros(P))


def test_updates_the_protocol_cannot_take_are_rejected_not_raised():
    sizes = {"a": 5, "b": 5, "c": 5}
    srv = _server(SecureAggregator(clip=1.0), 3)
    srv.plan(1, sizes)
    srv.begin(1)
    assert "not a key-sharing participant" in srv.offer(Update("z", torch.zeros(P), 5))
    assert srv.offer(Update("a", torch.zeros(P), 6)) is None  # announced counts bound nothing; the cap does
    assert srv.offer(Update("b", torch.zeros(P), 5)) is None
    assert "not a key-sharing participant" in srv.offer(Update("b", torch.zeros(P), 5))  # second update


def test_weights_are_capped_and_the_encoding_ignores_claims():
    """A READY of 2**40 moves neither the encoding width nor any weight past the public cap."""
    sizes = {"a": 2**40, "b": 5, "c": 5}
    agg = SecureAggregator(clip=1.0, max_weight=10)
    srv = _server(agg, 3)
    srv.plan(1, sizes)
    srv.begin(1)
    assert agg.last_round["modulus_bits"] == 24  # 3 * 10 * 32767 < 2^23, whatever "a" claims
    ups = {c: Update(c, torch.full((P,), 0.01 * (i + 1)), n) for i, (c, n) in enumerate(sizes.items())}
    for u in ups.values():
        assert srv.offer(u) is None
    out = srv.close()
    assert out.applied and out.weight == 10 + 5 + 5  # a's weight is clamped to the cap
    want = (10 * 0.01 + 5 * 0.02 + 5 * 0.03) / 20
    assert float((srv.global_vec.double() - want).abs().max()) < 1e-4
    with pytest.raises(ConfigError, match="max_weight"):
        SecureAggregator(max_weight=0)
    with pytest.raises(ConfigError, match="too small"):
        SecureAggregator(bits=40, max_weight=1 << 30)  # cannot fit even in 64-bit words


@pytest.mark.parametrize("weighting", ["samples", "uniform"])
def test_the_aggregate_is_the_decoded_sum_of_the_seeded_encodings_bit_for_bit(weighting):
    """The in-process round equals its reference: each survivor's update encoded with its seeded rounding noise,
    summed mod 2^k, decoded. The masks cancel exactly; nothing else enters."""
    from fedopt.aggregators.secure import round_encoding, seeded_noise
    from fedopt.secagg import decode_sum, encode_update

    sizes = {f"c{i}": 10 + i for i in range(7)}
    agg = SecureAggregator(clip=0.5, bits=14, weighting=weighting, seed=11, max_weight=100)
    ups = _updates(sizes, seed=4)
    survivors = [c for c in sorted(sizes) if c != "c2"]
    agg.begin(3, P, participants=sizes)
    for c in survivors:
        agg.add(ups[c])
    out = agg.result()
    quant = round_encoding(agg, len(sizes), sizes)
    total = np.zeros(quant.vector_length(P), dtype=quant.dtype)
    for c in survivors:
        weight = sizes[c] if quant.weighted else None
        total += encode_update(ups[c].delta.numpy(), quant, seeded_noise(11, c)(3), weight).vector
    mean, weight = decode_sum(total, quant, count=len(survivors))
    if weight is None:
        mean, weight = mean / len(survivors), len(survivors)
    assert torch.equal(out.delta, torch.from_numpy(mean.astype(np.float32)))
    assert out.weight == weight and out.count == len(survivors)
    assert agg.last_round["dropped"] == 1 and agg.last_round["clip_rate"] > 0  # clip 0.5 clips some updates
    assert agg.last_round["bytes_up"] > len(survivors) * 4 * P and agg.last_round["bytes_down"] > 0


def test_an_aborted_round_tells_every_client_logs_one_error_and_the_next_round_starts(caplog):
    agg = SecureAggregator(clip=1.0, bits=12)
    sizes = {f"c{i}": 10 for i in range(5)}  # k = 4, t = 3
    agg.begin(1, P, participants=sizes)
    with caplog.at_level(logging.INFO, logger="fedopt.secagg"):
        agg.add(Update("c0", torch.zeros(P), 10))
        assert agg.result() is None  # 1 of 5 masked its input: below t
    assert agg.last_round["aborted"] and "threshold" in agg.last_round["aborted"]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    told = {r.getMessage().split(":")[0] for r in caplog.records if "coordinator aborted" in r.getMessage()}
    assert told == {f"client c{i}" for i in range(5)}
    agg.begin(2, P, participants=sizes)
    assert agg.last_round["k"] == 4 and "aborted" not in agg.last_round


def test_begin_without_participants_is_a_clear_error():
    with pytest.raises(ConfigError, match="participants"):
        SecureAggregator().begin(1, P)


@pytest.mark.parametrize("name", ["median", "trimmed_mean"])
def test_plaintext_aggregators_refuse_to_combine_with_secagg(name):
    with pytest.raises(ConfigError, match="in the clear"):
        make_aggregator(name, secure=True)
    with pytest.raises(ConfigError, match="in the clear"):
        make_aggregator("secagg", inner=name)
    with pytest.raises(ConfigError, match="in the clear"):
        SecureAggregator(inner=make_aggregator(name))


def test_an_inner_aggregator_by_name_or_object_sets_the_weighting():
    assert make_aggregator("secagg", inner="mean").weighting == "uniform"
    assert make_aggregator("fedavg", secure=True).weighting == "samples"
    assert SecureAggregator(inner=make_aggregator("mean")).weighting == "uniform"
    assert SecureAggregator(inner="fedavg").weighting == "samples"
    with pytest.raises(ConfigError, match="fedavg or mean, not 'weighted'"):
        make_aggregator("weighted", secure=True)  # its factory needs arguments: refused by name


def test_secagg_aggregator_flags_fold_into_options_and_are_validated():
    cfg = build_config(None, {"aggregator": "secagg", "secagg_neighbours": 4, "secagg_threshold": 3,
                              "clip": 2.5, "bits": 12})
    agg = make_aggregator(cfg.federation.aggregator, **cfg.aggregator_options)
    assert (agg.neighbours, agg.threshold, agg.clip, agg.bits) == (4, 3, 2.5, 12)
    assert not agg.linear and not agg.needs_all_updates and not agg.needs_plaintext
    with pytest.raises(ConfigError, match="only apply to --aggregator secagg"):
        RunConfig.of(aggregator="fedavg", clip=1.0)
    with pytest.raises(ConfigError, match="clip"):
        RunConfig.of(aggregator="secagg", clip=-1.0)
    with pytest.raises(ConfigError, match="exceed half"):
        make_aggregator("secagg", neighbours=6, threshold=3)


def test_cli_rejects_secagg_flags_without_secagg(capsys, tmp_path):
    from fedopt.cli import main

    assert main(["simulate", "--clip", "1", "--rounds", "1", "--out", str(tmp_path)]) == 2
    assert "only apply to --aggregator secagg" in capsys.readouterr().err


def test_digits_with_secagg_matches_plain_fedavg_within_half_a_point():
    """Same seed and settings, 16-bit quantisation: accuracy within 0.5 points at the same round count."""
    from clients.simulation.run import Simulation

    # trained far enough (10 rounds of 2 epochs) for the comparison to be about a converging model
    base = dict(task="digits", clients=6, rounds=10, local_epochs=2, seed=0, progress="off", eval_every=1)
    plain = Simulation(RunConfig.of(**base))
    secure = Simulation(RunConfig.of(**base, aggregator="secagg", clip=10.0, bits=16))
    plain.run()
    secure.run()
    acc_plain, acc_secure = plain.evaluate()["accuracy"], secure.evaluate()["accuracy"]
    assert acc_plain > 0.85
    assert abs(acc_plain - acc_secure) <= 0.005, (acc_plain, acc_secure)
    diff = float((plain.server.global_vec - secure.server.global_vec).abs().max())
    assert 0 < diff < 1e-2  # quantised, so not identical, but close
