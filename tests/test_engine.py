"""fedopt.engine.Engine: the one round loop, driven through a scripted executor with exact outcomes."""

from __future__ import annotations

import torch

from fedopt.aggregators import Aggregate, Update, fedavg
from fedopt.engine import Engine, RoundServer
from fedopt.optimizers import make_server_optimizer
from fedopt.params import ParamSpec
from fedopt.task import TrainConfig


def make_server(per_round: int = 4) -> RoundServer:
    spec = ParamSpec.from_module(torch.nn.Linear(2, 1))  # 3 parameters
    return RoundServer(spec, torch.zeros(spec.size), fedavg(), make_server_optimizer("fedavg"), TrainConfig(),
                       per_round=per_round, seed=0)


class Scripted:
    """Clients 0..3, each sending a delta of its id + 1 in every coordinate; ``lost`` lists, per attempt, the clients
    that do not deliver (the engine's retries are counted by the attempts it asks for)."""

    def __init__(self, lost: list[set[str]] | None = None) -> None:
        self.lost = list(lost or [])
        self.attempts: list[tuple[int, int]] = []
        self.log: list[str] = []

    def available(self, round: int, attempt: int) -> dict[str, int]:
        self.attempts.append((round, attempt))
        return {str(i): 10 for i in range(4)}

    def run_round(self, server: RoundServer, jobs) -> None:
        lost = self.lost.pop(0) if self.lost else set()
        for job in jobs:
            if job.client in lost:
                server.reject(job.client, "lost")
            else:
                server.offer(Update(job.client, torch.full((3,), float(job.client) + 1), 10, {"loss": 1.0}))

    def fields(self, jobs, outcome) -> dict:
        return {"bytes_up": outcome.count}

    def close(self) -> None:
        pass


def test_a_round_below_its_quorum_is_retried_and_only_the_retry_moves_the_model():
    server, ex = make_server(), Scripted(lost=[{"0", "1", "2"}, set()])
    rec = Engine(server, ex, rounds=1, min_clients=2).run_round(1)
    assert ex.attempts == [(1, 1), (1, 2)]
    assert rec["attempts"] == 2 and rec["clients"] == 4 and rec["selected"] == 4
    # the first attempt's lone update (client 3: delta 4) was discarded: the mean of 1, 2, 3, 4 is 2.5
    assert torch.equal(server.global_vec, torch.full((3,), 2.5))


def test_without_a_quorum_a_round_of_rejected_updates_leaves_the_model_and_moves_on():
    server, ex = make_server(), Scripted(lost=[{"0", "1", "2", "3"}])
    rec = Engine(server, ex, rounds=1).run_round(1)  # in-process simulation: min_clients 0
    assert ex.attempts == [(1, 1)] and rec["clients"] == 0 and rec["rejected"] == 4
    assert torch.equal(server.global_vec, torch.zeros(3))


def test_a_secure_round_is_not_retried_its_threshold_is_its_quorum():
    server, ex = make_server(), Scripted()
    server.external = True  # the aggregate comes through absorb (SecAgg+ over the bus); nothing absorbed: aborted
    server.aggregator.needs_participants = True
    rec = Engine(server, ex, rounds=1, min_clients=3).run_round(1)
    assert ex.attempts == [(1, 1)] and rec["clients"] == 0 and rec["rejected"] == 4
    assert torch.equal(server.global_vec, torch.zeros(3))


def test_an_absorbed_secure_sum_is_the_step():
    server = make_server()
    server.external = True

    class Secure(Scripted):
        def run_round(self, server, jobs):
            assert server.offer(Update("0", torch.ones(3), 10)) is not None  # plaintext is refused
            server.absorb(Aggregate(torch.full((3,), 0.5), 40.0, 4), loss=2.0, samples=1)

    rec = Engine(server, Secure(), rounds=1).run_round(1)
    assert rec["clients"] == 4 and rec["train_loss"] == 2.0
    assert torch.equal(server.global_vec, torch.full((3,), 0.5))


def test_records_evaluation_hooks_and_checkpoint_order():
    server, ex, events = make_server(), Scripted(lost=[set(), {"0", "1", "2", "3"}, set()]), []

    class Hook:
        def begin(self):
            events.append("begin")

        def step(self):
            events.append("step")

    class Output:
        records: list = []

        def round_done(self, record, model):
            events.append(f"record {record['round']}")

    engine = Engine(server, ex, rounds=3, output=Output(), eval_every=2,
                    evaluate=lambda vec: {"accuracy": float(vec[0]), "loss": 0.0},
                    extra_eval=lambda vec: {"extra": True}, hooks=[Hook()],
                    checkpoint=lambda r, state: events.append(f"checkpoint {r} {state['attempts']} {sorted(state)}"))
    records = engine.run()
    assert [r["round"] for r in records] == [1, 2, 3]
    # evaluated on round 2 (eval_every) and round 3 (the last); round 2 delivered nothing, so the model stayed
    assert [r["accuracy"] for r in records] == [None, 2.5, 5.0] and "extra" not in records[0] and records[2]["extra"]
    assert [r["bytes_up"] for r in records] == [4, 0, 4]
    # the checkpoint keeps the attempts and the server's state (the norm bound's reference)
    kept = "1 ['attempts', 'norm']"
    assert events == ["begin", "step", "record 1", f"checkpoint 1 {kept}", "begin", "record 2", f"checkpoint 2 {kept}",
                      "begin", "step", "record 3", f"checkpoint 3 {kept}"]


def test_federated_evaluation_is_the_sample_weighted_mean_of_the_clients_results():
    class WithEval(Scripted):
        def federated_eval(self, round, vec):
            return [(1.0, 0.5, 30), (0.0, 1.5, 10)]

    rec = Engine(make_server(), WithEval(), rounds=2, fed_eval_every=2).run_round(2)
    assert (rec["fed_accuracy"], rec["fed_loss"], rec["fed_clients"]) == (0.75, 0.75, 2)
    rec = Engine(make_server(), WithEval(), rounds=2, fed_eval_every=2).run_round(1)
    assert "fed_accuracy" not in rec
