"""The vmap backend: train a whole batch of clients at once with ``torch.func``.

Every client of a batch has its own copy of the parameters, stacked along a leading client axis; one step runs
``vmap(grad(loss))`` over that axis (``functional_call`` on the task's own model, the task's own ``loss``), so B small
models cost about as much as one large one. Local training follows :func:`fedopt.task.sgd_loop` step for step:

* each client shuffles with its own generator seeded by its job's seed, one ``randperm`` per epoch, and takes batches
  of ``batch_size`` in that order, the last one short: exactly ``ceil(n / batch_size)`` steps per epoch, exactly its
  own samples. Batches are padded to ``batch_size`` with a mask, and the loss is the mean over the real samples, which
  is why the task's ``loss`` must be a mean over the samples of its batch (checked once at start-up);
* clients are sorted by their number of steps, so at step ``t`` the clients still training are a prefix of the batch
  and finished ones cost nothing (bucketing by size without padding whole steps);
* SGD with momentum and weight decay as ``torch.optim.SGD`` does it, FedProx's ``mu/2 ||w - w_global||^2``,
  straggler step budgets, and SCAFFOLD's gradient correction ``c - c_i`` (Adam, AdamW, gradient clipping and
  Dataset-backed data fall back to the sequential backend).

A linear aggregator's weighted mean is formed in one matrix product and merged into the server; other aggregators get
every update by ``offer``. A model that cannot be vmapped (a task with its own ``train``, BatchNorm or any other
buffer, i.e. state shared across samples, randomness, a loss that is not a per-sample mean) makes
:func:`vmap_unsupported` return the reason, and the engine falls back to the sequential backend with one line.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from fedopt.aggregators import Update
from fedopt.params import ParamSpec
from fedopt.engine import Job, RoundServer
from fedopt.task import BaseTask, Task, TrainConfig

from clients.simulation.scaffold import ScaffoldClients, ScaffoldServer
from clients.simulation.shards import ShardSource

__all__ = ["VmapExecutor", "vmap_unsupported"]

MAX_BATCH_BYTES = 512 << 20  # stacked parameters, gradients and momentum of one batch of clients


class _LossOf(nn.Module):
    """``task.loss(model, batch)`` as a module, so functional_call swaps the parameters the loss itself sees."""

    def __init__(self, task: Task, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self._task = task

    def forward(self, *batch):
        return self._task.loss(self.model, batch)


def vmap_unsupported(task: Task, spec: ParamSpec, shards: ShardSource, train: TrainConfig,
                     device: torch.device) -> str | None:
    """Why the vmap backend cannot train this task (one phrase), or None when it can."""
    if getattr(type(task), "train", None) is not BaseTask.train or not callable(getattr(task, "loss", None)):
        return "the task writes its own train(); vmap vectorises fedopt's standard loop"
    if train.optimizer != "sgd":
        return f"optimizer {train.optimizer} (vmap vectorises SGD with momentum only)"
    if train.clip_norm:
        return "gradient clipping (vmap does not clip per client)"
    if not shards[0].tensors:
        return "the task's data are a torch Dataset; vmap needs in-memory tensors"
    model = task.build_model().to(device)
    if any(True for _ in model.buffers()):
        return "the model has buffers (e.g. BatchNorm running statistics): state shared across samples"
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(spec.names) != names:
        return "the model has frozen or non-parameter entries in its state"
    data = shards[0].train
    k = min(int(data[0].shape[0]), max(train.batch_size, 2))
    batch = tuple(t[:k] for t in data)
    fn = _LossOf(task, model)
    params = {f"model.{n}": p.detach() for n, p in model.named_parameters()}
    try:
        per = vmap(lambda *s: functional_call(fn, params, tuple(t.unsqueeze(0) for t in s)))(*batch)
        whole = fn(*batch)
    except Exception as e:  # noqa: BLE001 - any failure to vectorise is a reason to fall back
        return f"torch.func cannot vmap this model or loss ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    if per.shape != (k,) or not torch.allclose(per.mean(), whole.detach(), rtol=1e-4, atol=1e-6):
        return "the task's loss is not a mean over the samples of its batch"
    return None


class VmapExecutor:
    """``run_round(server, jobs)``: the round's clients in batches of stacked parameters, one vmapped step at a time."""

    def __init__(self, task: Task, spec: ParamSpec, shards: ShardSource, device: torch.device,
                 scaffold: ScaffoldServer | None = None, state_budget_bytes: int = 256 << 20) -> None:
        self.task, self.spec, self.shards, self.device = task, spec, shards, device
        model = task.build_model().to(device)
        self._fn = _LossOf(task, model)
        self._names = [e.name for e in spec.entries]
        self.control = scaffold
        self.clients = ScaffoldClients(task, spec, state_budget_bytes) if scaffold is not None else None
        self.max_batch = max(1, MAX_BATCH_BYTES // (3 * 4 * spec.size))
        self._steppers: dict[int, object] = {}

    # ---- planning a batch ---------------------------------------------------------------------------------------------
    def _plan(self, jobs: list[Job]):
        """Concatenated data, and per step the (active prefix, sample index, mask) of every client in the batch."""
        datas = [self.shards[int(j.client)].train for j in jobs]
        sizes = [int(d[0].shape[0]) for d in datas]
        bs = jobs[0].config.batch_size
        totals, per_epoch, vals, epoch_of = [], [], [], []
        for job, n in zip(jobs, sizes):
            c = job.config
            s = math.ceil(n / bs)
            total = c.epochs * s if c.max_steps is None else min(c.epochs * s, c.max_steps)
            # sgd_loop's shuffle, exactly: a generator seeded by the job's seed, one randperm per epoch
            gen = torch.Generator(device="cpu").manual_seed(int(c.seed) & 0x7FFF_FFFF_FFFF_FFFF)
            epochs = math.ceil(total / s) if s else 0
            vals.extend(torch.randperm(n, generator=gen) for _ in range(epochs))
            epoch_of.append(epochs)
            totals.append(total)
            per_epoch.append(s)
        rank = sorted(range(len(jobs)), key=lambda i: -totals[i])
        pos = torch.empty(len(jobs), dtype=torch.long)
        pos[torch.tensor(rank, dtype=torch.long)] = torch.arange(len(jobs))
        n_t = torch.tensor(sizes, dtype=torch.long)
        e_t = torch.tensor(epoch_of, dtype=torch.long)
        # one entry per (client, epoch, sample): where it goes in the (step, client, slot) index
        reps = n_t * e_t
        client = torch.repeat_interleave(torch.arange(len(jobs)), reps)
        start = torch.cumsum(reps, 0) - reps
        k = torch.arange(int(reps.sum())) - start[client]
        epoch, j = k // n_t[client], k % n_t[client]
        step = epoch * torch.tensor(per_epoch, dtype=torch.long)[client] + j // bs
        offsets = torch.cumsum(n_t, 0) - n_t
        val = (torch.cat(vals) if vals else torch.empty(0, dtype=torch.long)) + offsets[client]
        keep = step < torch.tensor(totals, dtype=torch.long)[client]
        steps = max(totals) if totals else 0
        idx = torch.full((steps, len(jobs), bs), -1, dtype=torch.long)
        idx[step[keep], pos[client[keep]], (j % bs)[keep]] = val[keep]
        ordered = sorted(totals, reverse=True)
        active = [sum(1 for t in ordered if t > s) for s in range(steps)]
        cat = tuple(torch.cat([d[i] for d in datas]) for i in range(len(datas[0])))
        return rank, [totals[i] for i in rank], [sizes[i] for i in rank], idx.to(self.device), active, cat

    # ---- the round --------------------------------------------------------------------------------------------------
    def run_round(self, server: RoundServer, jobs: list[Job]) -> None:
        todo = []
        for job in jobs:
            if job.straggler and not server.keep_stragglers:
                server.reject(job.client, "straggler dropped")
            else:
                todo.append(job)
        if self.clients is not None:
            self.clients.begin()
        for s in range(0, len(todo), self.max_batch):
            self._train_batch(server, todo[s : s + self.max_batch])
        if self.clients is not None:
            self.control.add(self.clients.sum, self.clients.count)

    def _train_batch(self, server: RoundServer, jobs: list[Job]) -> None:
        rank, totals, sizes, idx, active, data = self._plan(jobs)
        jobs = [jobs[i] for i in rank]
        B, cfg, dev = len(jobs), jobs[0].config, self.device
        g = server.global_vec.to(dev)
        base = self.spec.unflatten(g)
        params = {f"model.{n}": base[n].detach().unsqueeze(0).repeat(B, *[1] * base[n].dim()) for n in self._names}
        anchor = {k: base[k[6:]].detach() for k in params} if cfg.mu > 0 else None
        bufs = {k: torch.zeros_like(v) for k, v in params.items()} if cfg.momentum > 0 else None
        corr = self._corrections(jobs, g) if self.clients is not None else None
        loss_sum = torch.zeros(B, device=dev)
        data = tuple(t.to(dev) for t in data)
        for t, k in enumerate(active):
            i = idx[t, :k]
            mask = (i >= 0).to(data[0].dtype if data[0].is_floating_point() else torch.float32)
            i = i.clamp(min=0)
            batch = tuple(d[i] for d in data)
            view = {n: p[:k] for n, p in params.items()}
            grads, losses = self._stepper(len(batch))(view, anchor, cfg.mu, mask, *batch)
            loss_sum[:k] += losses
            with torch.no_grad():
                for n, p in view.items():
                    d = grads[n]
                    if corr is not None:
                        d = d + corr[n][:k]
                    if cfg.weight_decay:
                        d = d + cfg.weight_decay * p
                    if bufs is not None:
                        b = bufs[n][:k]
                        b.mul_(cfg.momentum).add_(d) if t > 0 else b.copy_(d)
                        d = b
                    p.sub_(cfg.lr * d)
        self._finish(server, jobs, totals, sizes, params, g, loss_sum)

    def _stepper(self, nb: int):
        """``vmap(grad(client loss))`` over the client axis for batches of ``nb`` aligned tensors (built once)."""
        if nb not in self._steppers:
            self._steppers[nb] = vmap(grad(self._client_loss(), has_aux=True), in_dims=(0, None, None, 0) + (0,) * nb)
        return self._steppers[nb]

    def _client_loss(self):
        fn = self._fn

        def client_loss(params, anchor, mu, mask, *batch):
            per = vmap(lambda *s: functional_call(fn, params, tuple(t.unsqueeze(0) for t in s)))(*batch)
            loss = (per * mask).sum() / mask.sum().clamp(min=1)
            total = loss
            if anchor is not None:
                total = total + 0.5 * mu * sum(((params[k] - anchor[k]) ** 2).sum() for k in params)
            return total, loss.detach()

        return client_loss

    def _corrections(self, jobs: list[Job], g: torch.Tensor) -> dict[str, torch.Tensor]:
        c = self.control.control.to(g.device, torch.float32)
        rows = torch.stack([c - m.to(g.device) if (m := self.clients.store.get(j.client)) is not None else c
                            for j in jobs])
        return {f"model.{e.name}": rows[:, e.offset:e.offset + e.numel].view(len(jobs), *e.shape)
                for e in self.spec.entries}

    def _finish(self, server, jobs, totals, sizes, params, g, loss_sum) -> None:
        B = len(jobs)
        rows = [params[f"model.{n}"].reshape(B, -1) for n in self._names]  # views: no copy of B models
        steps = torch.tensor(totals, dtype=torch.float32, device=g.device)
        losses = (loss_sum / steps.clamp(min=1)).tolist()
        cfg = jobs[0].config
        full = [c.config.epochs * math.ceil(n / c.config.batch_size) for c, n in zip(jobs, sizes)]
        partial = [totals[b] < full[b] for b in range(B)]
        metrics = [{"loss": losses[b], "steps": totals[b], "samples": sizes[b], "partial": partial[b]}
                   for b in range(B)]
        agg = server.aggregator
        linear = getattr(agg, "linear", False) and callable(getattr(agg, "weight", None)) \
            and not getattr(agg, "needs_plaintext", False)
        if not linear or self.clients is not None:
            # every update on its own (secure/robust aggregators, SCAFFOLD's per-client state): one B x P matrix
            deltas = torch.cat(rows, dim=1).sub_(g)
            updates = [Update(j.client, deltas[b], sizes[b], metrics[b], partial[b]) for b, j in enumerate(jobs)]
            if linear:
                keep = self._merge_linear(server, agg, updates, deltas, losses, rows=None, g=g)
            else:
                keep = server.offer_rows(updates, deltas)
            if self.clients is not None:
                c = self.control.control.to(deltas.device, torch.float32)
                for b in keep:
                    self.clients.commit(jobs[b].client, self.clients.control_delta(deltas[b], c, totals[b], cfg.lr))
            return
        # Linear aggregation straight from the stacked parameters: the weighted mean of (local - global) is the
        # weighted mean of local minus global, so no B x P matrix of deltas is ever built.
        updates = [Update(j.client, None, sizes[b], metrics[b], partial[b]) for b, j in enumerate(jobs)]
        self._merge_linear(server, agg, updates, None, losses, rows=rows, g=g)

    def _merge_linear(self, server, agg, updates, deltas, losses, *, rows, g) -> list[int]:
        """Validate every update and merge the survivors' weighted mean into ``server``; returns the kept indices."""
        B = len(updates)
        # the L2 norm of each delta in one pass (NaN and Inf survive it), for the server's bounds
        if deltas is not None:
            norms = torch.linalg.vector_norm(deltas, dim=1)
        else:  # ||r - g||^2 = ||r||^2 - 2 r.g + ||g||^2, chunk by chunk: no B x P temporary
            sq, at = torch.zeros(B, dtype=g.dtype, device=g.device), 0
            for r in rows:
                gc = g[at:at + r.shape[1]]
                sq += torch.linalg.vector_norm(r, dim=1).square_() - 2 * (r @ gc) + gc.dot(gc)
                at += r.shape[1]
            norms = sq.clamp_(min=0).sqrt_()  # NaN and Inf survive the clamp
        norms = norms.tolist()
        keep = []
        for b, u in enumerate(updates):
            u.num_samples = server.granted(u.client, u.num_samples)
            reason = server.norm_reason(norms[b])
            if reason is None and u.partial:
                if u.delta is None:
                    u.delta = torch.cat([r[b] for r in rows]).sub_(g)
                reason = server.check(u)
            if reason is None:
                keep.append(b)
                server.accepted_norm(norms[b])
            else:
                server.reject(u.client, reason)
        if not keep:
            return keep
        w = torch.zeros(B, dtype=g.dtype, device=g.device)
        w[keep] = torch.tensor([agg.weight(updates[b]) for b in keep], dtype=g.dtype, device=g.device)
        total = float(w.sum())
        if total > 0:
            w /= total
            mean = (w @ deltas) if deltas is not None else torch.cat([w @ r for r in rows]).sub_(g)
            n = [updates[b].num_samples for b in keep]
            loss = sum(losses[b] * updates[b].num_samples for b in keep) / max(sum(n), 1)
            server.merge(mean, total, len(keep), loss, sum(n))
        return keep

    @property
    def trainer(self):
        return None

    def close(self) -> None:
        if self.clients is not None:
            self.clients.close()
