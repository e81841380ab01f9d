"""A plain, hand-written torch DDP training script: the baseline ``benchmarks/allreduce.py`` compares fedopt against.

Run under torchrun. It takes the same model and data as fedopt (the task's ``build_model`` and full train split), the
same ``DistributedSampler`` sharding, the same per-worker batch and the same number of steps per epoch, and trains
with the textbook loop: DDP with its built-in all-reduce, ``torch.optim.SGD``, cross-entropy. Rank 0 writes the
per-epoch training seconds and step counts as JSON to ``--result``.

    torchrun --nproc-per-node 2 benchmarks/plain_ddp.py --task digits --batch-size 64 --steps 20 --epochs 6 \\
        --result /tmp/plain.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data.distributed import DistributedSampler

from fedopt.cli.options import parse_kv
from fedopt.data import PartitionSpec
from fedopt.task import resolve_task


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="digits")
    p.add_argument("--task-option", action="append", type=parse_kv, default=[])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per epoch")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result", required=True)
    args = p.parse_args()

    use_cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=300))
    rank, world = dist.get_rank(), dist.get_world_size()

    task = resolve_task(args.task, dict(args.task_option))
    torch.manual_seed(args.seed)
    model = DDP(task.build_model().to(device), device_ids=[local_rank] if use_cuda else None)
    x, y = (t.to(device) for t in task.load_data(0, 1, args.seed, PartitionSpec("iid")).train)
    sampler = DistributedSampler(range(x.shape[0]), num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)

    seconds, steps = [], []
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        order = torch.as_tensor(list(sampler), dtype=torch.long, device=device)
        t0 = time.perf_counter()
        n = 0
        for s in range(0, order.numel(), args.batch_size):
            if n >= args.steps:
                break
            idx = order[s : s + args.batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n += 1
        if use_cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
        steps.append(n)
    if rank == 0:
        with open(args.result, "w") as f:
            json.dump({"train_seconds": seconds, "steps": steps, "world": world}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
