"""The round the engine drives: select, plan, accept, aggregate, step.

``RoundServer`` owns the global model, the aggregator and the server optimizer, and nothing else: no sockets, no
clocks, no files. :class:`~fedopt.engine.loop.Engine` calls it the same way for every executor (and a simulation
worker pre-aggregates its share with one of its own), which is what makes the modes' results comparable seed for
seed::

    jobs = server.plan(round, sizes)       # who trains, with which TrainConfig (seed, straggler budget)
    server.begin(round)                    # participants: the last plan's clients (secure aggregation needs them)
    server.offer(update) -> reason | None  # an executor folds in one update (None = accepted)
    server.merge(mean, weight, count)      # or a pre-aggregated partial (linear aggregators: vmap, pool workers)
    server.absorb(aggregate)               # or a sum a protocol computed outside the aggregator (SecAgg+ on the bus)
    outcome = server.close()               # apply the aggregate with the server optimizer

Bounded influence (:class:`~fedopt.config.Bounds`): no client's claim sets its influence unchecked. A client's weight is
the sample count it announced when it became ready (never what an update says), capped at ``max_samples`` and at a
``max_share`` of the round's total weight; an update whose L2 norm exceeds ``norm_factor`` times the median norm of
the last round's accepted updates (before any round: the global model's norm, at least 1), or ``max_update_norm``,
is rejected and counted in the round's ``rejected``.

Sampling: ``fixed`` draws exactly ``per_round`` clients without replacement; ``poisson`` takes each client independently
with probability ``per_round / population``. Under differential privacy (``--dp central``: the aggregator is a
:class:`~fedopt.privacy.CentralDP`, whose accountant assumes that sampling over ``population`` clients) a fixed draw is
made over all ``population`` clients, those not ready counting as absent; the relative norm bound is off (the median
of one round's updates would let a client sway the next round, outside the accounting: clipping bounds every update);
and a round below quorum closes anyway (retrying would redraw its cohort), releasing the noised sum like every round.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import torch

from ..aggregators import Aggregator, Update, make_aggregator
from ..config import Bounds
from ..errors import ConfigError, SecAggError
from ..optimizers import ServerOptimizer, make_server_optimizer
from ..params import ParamSpec
from ..task import TrainConfig
from .tiers import leaf_quotas

__all__ = ["Bounds", "Job", "RoundOutcome", "RoundServer", "capped_weights", "client_seed"]


def client_seed(seed: int, round: int, client: str) -> int:
    """A per-(run, round, client) seed, independent of how clients are spread over processes.

    BLAKE2b of the three, cut to 63 bits: about a microsecond, so planning 10,000 clients costs milliseconds."""
    h = hashlib.blake2b(f"{seed}/{round}/{client}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


def capped_weights(sizes: Mapping[str, int], max_samples: int, max_share: float) -> dict[str, int]:
    """Each client's weight: its sample count capped at ``max_samples`` and at a share ``s = max(max_share, 1.5/k)``
    of the capped total of the ``k`` clients (water-filling: the largest are cut to one level ``c`` with
    ``c = s * sum(min(w, c))``), floored to integers >= 1. Caps that do not bind leave the counts unchanged. The
    floor 1.5/k keeps small rounds weighted by their data (equal weights would need s = 1/k)."""
    w = {c: max(1, min(int(n), max_samples)) for c, n in sizes.items()}
    k = len(w)
    if k < 2:
        return w
    s = max(max_share, 1.5 / k)
    desc = sorted(w.values(), reverse=True)
    rest = float(sum(desc))
    for j in range(k):  # try capping the j largest weights at level c
        if j * s >= 1:
            break
        c = s * rest / (1 - j * s)
        if desc[j] <= c:
            if j == 0:
                return w
            level = max(1, math.floor(c))
            return {cid: min(v, level) for cid, v in w.items()}
        rest -= desc[j]
    return w


@dataclass
class Job:
    client: str  # the client's id
    config: TrainConfig  # what it is asked to do this round
    straggler: bool = False  # it was chosen to do only part of its work
    sample: tuple[int, int] | None = None  # an edge's (leaf quota, leaf count it announced): see .tiers


@dataclass
class RoundOutcome:
    round: int
    applied: bool  # the global model moved
    count: int  # client updates folded in
    weight: float  # their total weight
    rejected: dict[str, str] = field(default_factory=dict)  # client -> reason
    train_loss: float | None = None  # sample-weighted mean of the clients' reported training loss


class RoundServer:
    """Server-side state of a federated run, driven one round at a time."""

    def __init__(
        self,
        spec: ParamSpec,
        global_vec: torch.Tensor,
        aggregator: Aggregator,
        optimizer: ServerOptimizer,
        train: TrainConfig,
        *,
        per_round: int,
        seed: int = 0,
        stragglers: float = 0.0,
        keep_stragglers: bool = False,
        bounds: Bounds | None = None,
        lr_at: Callable[[int], float] | None = None,
        sampling: str = "fixed",
        population: int = 0,
    ) -> None:
        spec.check_vector(global_vec)
        if hasattr(aggregator, "check_round_size"):
            aggregator.check_round_size(per_round)  # e.g. a trimmed mean that would trim nothing
        self.spec = spec
        self.global_vec = global_vec
        self.aggregator = aggregator
        self.optimizer = optimizer
        self.train = train
        self.lr_at = lr_at  # the round's client learning rate (a schedule over rounds); None: train.lr throughout
        self.per_round = per_round
        self.seed = seed
        self.stragglers = stragglers
        self.keep_stragglers = keep_stragglers
        self.sampling = sampling  # fixed | poisson (see the module docstring)
        self.population = population  # clients a round samples from (0: the candidates it is offered)
        self._round: int | None = None
        self._rejected: dict[str, str] = {}
        self._loss_sum = 0.0
        self._loss_weight = 0.0
        self._planned: tuple[int, dict[str, int]] | None = None  # (round, {client: weight}) of the last plan
        #: edge aggregators among the candidates: client -> the leaf clients it announced (set by the bus executor
        #: each round); when one is a candidate, a ``fixed`` round samples leaves through them (.tiers)
        self.leaves: dict[str, int] = {}
        self.bounds = bounds  # None: clients are trusted (a simulation worker pre-aggregating its own clients)
        self.norm_ref: float | None = None  # median L2 norm of the last round's accepted updates
        #: > 0: the reference is the median of the last ``norm_window`` accepted norms, across rounds (a buffered
        #: engine's step holds only K updates, too few to judge the next ones by)
        self.norm_window = 0
        self._recent: deque[float] = deque()
        self._norm_bound = math.inf  # the current round's bound on an update's norm
        self._norms: list[float] = []
        self.accepted = 0  # client updates folded into the round so far (merged partials count their clients)
        self._absorbed = None  # an aggregate a protocol computed outside the aggregator (absorb)
        #: the round's aggregate comes only through :meth:`absorb` (SecAgg+ over the bus): the aggregator is not
        #: driven, and a plaintext update is refused
        self.external = False

    @classmethod
    def for_run(cls, cfg, task, device: torch.device) -> "RoundServer":
        """The server of a run (a RunConfig): the task's initial model seeded by ``cfg.seed`` (every mode starts
        from the same one), its aggregator, server optimizer, client training config and bounds."""
        torch.manual_seed(cfg.seed)
        model = task.build_model()
        spec = ParamSpec.from_module(model, cfg.train.buffers)
        fed = cfg.federation
        aggregator, bounds = make_aggregator(fed.aggregator, **cfg.aggregator_options), cfg.bounds
        if cfg.privacy.dp is not None:  # --dp central|distributed: DP-FedAvg (fedopt.privacy, an optional extra)
            from ..privacy import privacy_for_run

            aggregator = privacy_for_run(cfg, aggregator, device, spec.size)
            bounds = dataclasses.replace(bounds, norm_factor=0)
        return cls(spec, spec.flatten(model).to(device), aggregator,
                   make_server_optimizer(fed.server_opt, fed.server_lr, **fed.server_options), cfg.train.train_config(),
                   per_round=fed.per_round, seed=cfg.seed, stragglers=fed.stragglers,
                   keep_stragglers=cfg.keep_stragglers, bounds=bounds, lr_at=cfg.lr_at,
                   sampling=fed.client_sampling,
                   population=fed.clients if cfg.privacy.dp is not None or fed.client_sampling == "poisson" else 0)

    @property
    def round(self) -> int | None:
        """The round in progress (between :meth:`begin` and :meth:`close`), else None."""
        return self._round

    @property
    def rejected(self) -> dict[str, str]:
        """The round's refused or failed clients so far, with why."""
        return dict(self._rejected)

    @property
    def retryable(self) -> bool:
        """Whether a round short of its quorum may be retried: not under secure aggregation, whose own threshold
        is its quorum (a retry would meet the same dead clients; the next round selects among the live ones), nor
        under differential privacy (a retry would redraw the cohort the accountant counts on), nor under Poisson
        sampling (a small or empty cohort is the sampling's own outcome, and its draw would repeat)."""
        return not getattr(self.aggregator, "needs_participants", False) and self.privacy is None \
            and self.sampling != "poisson"

    @property
    def privacy(self):
        """The DP-FedAvg wrapper that is this server's aggregator (:class:`fedopt.privacy.CentralDP`), or None."""
        return self.aggregator if getattr(self.aggregator, "accountant", None) is not None else None

    def state(self) -> dict:
        """What a checkpoint keeps of this server beside the model and the optimizer: the norm bound's reference
        (a resumed run bounds updates as it would have) and the privacy ledger."""
        out = {"norm": {"ref": self.norm_ref, "recent": list(self._recent)}}
        if self.privacy is not None:
            out["privacy"] = self.privacy.state()
        return out

    def restore(self, state: dict) -> None:
        """Continue from a checkpoint's :meth:`state` (ConfigError when its privacy parameters differ)."""
        if "norm" in state:
            ref, recent = state["norm"].get("ref"), state["norm"].get("recent") or []
            self.norm_ref = float(ref) if ref is not None else None
            self._recent = deque(float(x) for x in recent)
        if self.privacy is not None and "privacy" in state:
            self.privacy.load_state(state["privacy"])

    # ---- planning ---------------------------------------------------------------------------------------------------
    def select(self, round: int, candidates: list[str]) -> list[str]:
        """The round's cohort, seeded by (seed, round): the same run selects the same clients. ``fixed``: uniform
        sampling of ``per_round`` without replacement, over ``population`` slots when that exceeds the candidates
        (a slot past them is a client not ready: absent); ``poisson``: each candidate with probability
        ``per_round / population``."""
        pool = sorted(candidates)
        n = max(self.population, len(pool))
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, round, 1])
        if self.sampling == "poisson":
            return [c for c, u in zip(pool, rng.random(len(pool))) if u < self.per_round / n]
        k = min(self.per_round, n)
        return [pool[i] for i in sorted(rng.choice(n, size=k, replace=False)) if i < len(pool)]

    def plan(self, round: int, sizes: Mapping[str, int]) -> list[Job]:
        """Select clients and give each a TrainConfig. ``sizes`` maps each available client to its sample count.

        Stragglers (Li et al., MLSys 2020, Section 5.2): a ``stragglers`` fraction of the selected clients do a number
        of local steps drawn uniformly from [1, full work]; FedProx keeps that partial work, FedAvg drops it.
        """
        if self.bounds is not None:  # a claimed count is never used uncapped, not even for a straggler's budget
            sizes = {c: max(1, min(int(n), self.bounds.max_samples)) for c, n in sizes.items()}
        quotas = None
        if self.leaves and self.sampling == "fixed" and any(c in self.leaves for c in sizes):
            # edges among the candidates: the round samples leaf clients through them (.tiers)
            leaves = {c: self.leaves.get(c, 1) for c in sizes}
            quotas = leaf_quotas(self.seed, round, leaves, self.per_round)
            chosen = sorted(quotas)
            # an edge weighs at most its quota's share of the weight it announced (the stratified estimate of its
            # sampled clients' weight): its claim cannot buy it more than its share of the round's leaves
            sizes = {c: -(-n * quotas[c] // leaves[c]) if c in self.leaves else n for c, n in sizes.items()
                     if c in quotas}
        else:
            chosen = self.select(round, list(sizes))
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, round, 2])
        n_slow = int(round_half_up(self.stragglers * len(chosen)))
        slow = set(rng.choice(len(chosen), size=n_slow, replace=False).tolist()) if n_slow else set()
        jobs = []
        for i, cid in enumerate(chosen):
            job = self.job(round, cid)
            if quotas is not None and cid in self.leaves:
                job.sample = (quotas[cid], leaves[cid])
            if i in slow:
                full = job.config.epochs * job.config.steps_per_epoch(max(sizes[cid], 1))
                job.config.max_steps = int(rng.integers(1, full + 1))
                job.straggler = True
            jobs.append(job)
        self.grant(round, {cid: int(sizes[cid]) for cid in chosen})
        return jobs

    def job(self, round: int, client: str) -> Job:
        """``client``'s work in ``round``: the run's TrainConfig with the client's own seed and the round's lr."""
        cfg = TrainConfig(**{**self.train.__dict__, "seed": client_seed(self.seed, round, client)})
        if self.lr_at is not None:
            cfg.lr = float(self.lr_at(round))
        return Job(client, cfg)

    def grant(self, round: int, sizes: Mapping[str, int]) -> None:
        """The weights updates of ``round`` may carry: each client's announced count, capped (:class:`Bounds`)."""
        sizes = {c: int(n) for c, n in sizes.items()}
        if self.bounds is not None:
            sizes = capped_weights(sizes, self.bounds.max_samples, self.bounds.max_share)
        self._planned = (round, sizes)

    # ---- a round ----------------------------------------------------------------------------------------------------
    def begin(self, round: int, participants: Mapping[str, int] | None = None) -> None:
        """Start a round. ``participants`` (client id -> announced num_samples) defaults to this round's plan;
        it is passed only to aggregators that set ``needs_participants`` (secure aggregation shares keys among
        exactly these clients before any update exists)."""
        self._round = round
        self._rejected = {}
        self._loss_sum = self._loss_weight = 0.0
        self._norms = []
        self._norm_bound = self._bound()
        self.accepted = 0
        self._absorbed = None
        if self.external:
            pass
        elif getattr(self.aggregator, "needs_participants", False):
            if participants is None and self._planned is not None and self._planned[0] == round:
                participants = self._planned[1]
            self.aggregator.begin(round, self.spec.size, participants=participants)
        else:
            self.aggregator.begin(round, self.spec.size)

    def _bound(self) -> float:
        """This round's cap on an update's L2 norm (see the module docstring)."""
        b = self.bounds
        if b is None:
            return math.inf
        bound = math.inf if b.max_update_norm is None else float(b.max_update_norm)
        if b.norm_factor:
            ref = self.norm_ref if self.norm_ref else max(float(torch.linalg.vector_norm(self.global_vec)), 1.0)
            bound = min(bound, b.norm_factor * ref)
        return bound

    def weight_of(self, client: str) -> int | None:
        """The weight this round's plan grants ``client`` (its announced, capped sample count), or None."""
        if self._planned is None or self._planned[0] != self._round:
            return None
        return self._planned[1].get(client)

    def check(self, update: Update) -> str | None:
        """Why an update must be refused, or None when it may be aggregated. Never raises."""
        return self._check(update)[0]

    def granted(self, client: str, claimed: int) -> int:
        """The weight an update of ``client`` claiming ``claimed`` samples gets: at most what the plan granted it
        (an executor that aggregates on its own, like vmap, weighs with this, as :meth:`offer` does)."""
        granted = self.weight_of(client)
        if granted is not None:
            return min(claimed, granted)
        return min(claimed, self.bounds.max_samples) if self.bounds is not None else claimed

    def norm_reason(self, norm: float) -> str | None:
        """Why an update of L2 norm ``norm`` must be refused (non-finite, or over this round's bound), or None."""
        if not math.isfinite(norm):
            return "non-finite values (NaN or Inf) in the update"
        if norm > self._norm_bound:
            return f"L2 norm {norm:.4g} over the bound of {self._norm_bound:.4g}"
        return None

    def accepted_norm(self, norm: float) -> None:
        """Record the norm of an update aggregated outside :meth:`offer` (the next round's reference)."""
        self._norms.append(norm)

    def _check(self, update: Update) -> tuple[str | None, float]:
        """(why an update must be refused or None, its L2 norm)."""
        d = update.delta
        if not isinstance(d, torch.Tensor) or d.dim() != 1 or d.numel() != self.spec.size:
            return f"wrong length: {getattr(d, 'shape', None)} for a model of {self.spec.size}", math.nan
        if not isinstance(update.num_samples, int) or update.num_samples < 0:
            return f"invalid num_samples {update.num_samples!r}", math.nan
        norm = float(torch.linalg.vector_norm(d))  # one reduction; any NaN/Inf element makes it NaN/Inf
        if not math.isfinite(norm) and bool(torch.isfinite(d).all()):
            return f"L2 norm overflows {d.dtype}, over the bound of {self._norm_bound:.4g}", norm
        return self._verdict(update, norm), norm

    def _verdict(self, update: Update, norm: float) -> str | None:
        """Why an update of a valid length and L2 norm ``norm`` must be refused (a bad sample count, the norm bound,
        a straggler's partial work), or None: what :meth:`offer` and :meth:`offer_rows` both judge."""
        if not isinstance(update.num_samples, int) or update.num_samples < 0:
            return f"invalid num_samples {update.num_samples!r}"
        if (reason := self.norm_reason(norm)) is not None:
            return reason
        if update.partial and not self.keep_stragglers:
            return "partial work from a straggler (dropped: FedAvg keeps only complete updates)"
        return None

    def offer(self, update: Update) -> str | None:
        """Validate and aggregate one update. Returns None when accepted, else the reason it was dropped.

        The update's weight is at most what this round's plan granted its client (an update may claim less, e.g.
        partial work, never more); a client outside the plan keeps its claim only when the server has no bounds."""
        if self._round is None:
            raise ConfigError("offer() before begin()")
        if self.external:
            self._rejected[update.client] = reason = "a plaintext update in a round aggregated securely"
            return reason
        if isinstance(update.num_samples, int) and update.num_samples > (w := self.granted(update.client,
                                                                                           update.num_samples)):
            update = dataclasses.replace(update, num_samples=w)
        reason, norm = self._check(update)
        if reason is None:
            try:
                self.aggregator.add(update)
            except (ConfigError, SecAggError) as e:
                reason = str(e)
        if reason is not None:
            self._rejected[update.client] = reason
            return reason
        self._norms.append(norm)
        self._note_loss(update.metrics.get("loss"), update.num_samples)
        self.accepted += 1
        return None

    def offer_rows(self, updates: list[Update], deltas: torch.Tensor) -> list[int]:
        """Validate and aggregate a batch of updates whose deltas are the rows of ``deltas`` (B x P, e.g. a vmap
        executor's stacked results; each ``updates[b].delta`` is row b or None). Returns the indices accepted.

        Each update is judged as :meth:`offer` judges it (the plan's weight, its norm against this round's bound, a
        straggler's partial work); an aggregator with ``add_rows(rows, norms, updates)`` then takes the survivors in
        one call, with their L2 norms (float64) computed in one pass here, instead of one ``add`` per update."""
        add_rows = getattr(self.aggregator, "add_rows", None)
        if add_rows is None or self.external or deltas.dim() != 2 or deltas.shape != (len(updates), self.spec.size):
            return [b for b, u in enumerate(updates) if self.offer(u if u.delta is not None
                                                                   else dataclasses.replace(u, delta=deltas[b])) is None]
        if self._round is None:
            raise ConfigError("offer_rows() before begin()")
        norms = torch.linalg.vector_norm(deltas, dim=1, dtype=torch.float64)  # NaN and Inf survive it
        keep, listed = [], norms.tolist()
        for b, (u, norm) in enumerate(zip(updates, listed)):
            if (reason := self._verdict(u, norm)) is not None:
                self._rejected[u.client] = reason
                continue
            u.num_samples = self.granted(u.client, u.num_samples)
            keep.append(b)
        if not keep:
            return keep
        chosen = [updates[b] for b in keep]
        every = len(keep) == len(updates)  # the usual case: no copy of the rows
        try:
            add_rows(deltas if every else deltas[keep], norms if every else norms[keep], chosen)
        except ConfigError as e:
            for u in chosen:
                self._rejected[u.client] = str(e)
            return []
        for b, u in zip(keep, chosen):
            self._norms.append(listed[b])
            self._note_loss(u.metrics.get("loss"), u.num_samples)
        self.accepted += len(keep)
        return keep

    def merge(self, mean: torch.Tensor, weight: float, count: int, loss: float | None = None,
              samples: int = 0) -> None:
        """Fold in a pre-aggregated partial from a simulation worker (linear aggregators only)."""
        if not getattr(self.aggregator, "linear", False):
            raise ConfigError(f"aggregator {self.aggregator.name!r} needs every update; it cannot merge partials")
        self.aggregator.merge(mean, weight, count)
        self.accepted += count
        self._note_loss(loss, samples)

    def absorb(self, aggregate, loss: float | None = None, samples: int = 0) -> None:
        """Take the round's aggregate from a protocol that computed it outside the aggregator (SecAgg+ over the bus:
        the coordinator only ever learns the survivors' sum); :meth:`close` steps with it."""
        self._absorbed = aggregate
        self.accepted = aggregate.count
        self._note_loss(loss, samples)

    @property
    def absorbed(self):
        """The aggregate :meth:`absorb` took this round (None before, or when the protocol aborted) and the
        sample-weighted training loss reported with it: ``(aggregate | None, loss | None)``."""
        return self._absorbed, (self._loss_sum / self._loss_weight if self._loss_weight else None)

    def share(self, aggregator) -> "RoundServer":
        """A server for a share of the round in progress (a simulation worker's or rank's clients): it judges updates
        exactly as this one does (bounds, the plan's weights, this round's norm bound) and feeds ``aggregator``; it
        never steps. Its :meth:`partial` and :attr:`norms` go back to this server (``merge``, ``accepted_norm``)."""
        s = RoundServer(self.spec, self.global_vec, aggregator, self.optimizer, self.train, per_round=1,
                        keep_stragglers=self.keep_stragglers, bounds=self.bounds)
        s._planned, s.norm_ref = self._planned, self.norm_ref
        s.begin(self._round)
        s._norm_bound = self._norm_bound
        return s

    @property
    def norms(self) -> list[float]:
        """The L2 norms of the updates accepted so far this round."""
        return list(self._norms)

    def partial(self) -> tuple:
        """What this round gathered so far, without stepping: ``(aggregate | None, mean loss | None, loss weight,
        rejected)``. A simulation worker pre-aggregates with its own RoundServer and forwards this with merge()."""
        loss = self._loss_sum / self._loss_weight if self._loss_weight else None
        return self.aggregator.result(), loss, self._loss_weight, dict(self._rejected)

    def reject(self, client: str, reason: str) -> None:
        """Record that a selected client's work was not used (it died, timed out, or was a dropped straggler)."""
        self._rejected[client] = reason

    def _note_loss(self, loss, weight) -> None:
        if loss is not None and math.isfinite(loss) and weight > 0:
            self._loss_sum += loss * weight
            self._loss_weight += weight

    def close(self) -> RoundOutcome:
        agg = self._absorbed if self._absorbed is not None or self.external else self.aggregator.result()
        self._absorbed = None
        r, self._round = self._round, None
        if self.norm_window:
            self._recent.extend(self._norms)
            while len(self._recent) > self.norm_window:
                self._recent.popleft()
            if self._recent:
                self.norm_ref = float(np.median(self._recent))
        elif self._norms:
            self.norm_ref = float(np.median(self._norms))
        loss = self._loss_sum / self._loss_weight if self._loss_weight else None
        if agg is None:
            return RoundOutcome(r, False, 0, 0.0, dict(self._rejected), loss)
        self.optimizer.step(self.global_vec, agg.delta.to(self.global_vec.dtype))
        return RoundOutcome(r, True, agg.count, agg.weight, dict(self._rejected), loss)


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))
