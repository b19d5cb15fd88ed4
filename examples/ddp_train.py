"""Data-parallel training with checkpoints that resume on any number of processes.

Run (CPU is fine: the gloo backend):

    torchrun --nproc-per-node 2 examples/ddp_train.py runs/ddp            # DDP on 2 processes
    torchrun --nproc-per-node 2 examples/ddp_train.py runs/fsdp --fsdp    # FSDP2: each rank saves its shards
    python examples/ddp_train.py runs/fsdp --steps 60                      # one process resumes that run
    torchkeep convert runs/fsdp/step-00000060 model.safetensors            # one file for inference

The run folder may be a URL (``s3://bucket/run``; credentials from the usual
AWS settings). Stop it at any moment (Ctrl-C, or ``--stop-after N``) and run
it again: it continues from the newest checkpoint, on as many ranks as you
start it with.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
from torch import nn

import torchkeep


def make_model() -> nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))


def global_batch(step: int, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's batch, the same on every rank; each rank trains on its own slice."""
    g = torch.Generator().manual_seed(step)
    x = torch.randn(size, 20, generator=g)
    return x, (x[:, :4].sum(dim=1, keepdim=True) > 0).long().squeeze(1) + 2 * (x[:, 4] > 0).long()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "run", nargs="?", default=None, help="run folder or URL (default: a temporary folder)"
    )
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--save-every", type=int, default=10)
    parser.add_argument("--stop-after", type=int, default=None, help="stop after this step (a 'crash')")
    parser.add_argument("--fsdp", action="store_true", help="shard the model with FSDP2 (fully_shard)")
    args = parser.parse_args()
    run = args.run or tempfile.mkdtemp(prefix="ddp-run-")

    distributed = "WORLD_SIZE" in os.environ  # set by torchrun
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1

    model = make_model()
    if distributed and args.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    elif distributed:
        model = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(1000 + rank)  # each rank's own random stream (dropout, augmentation, ...)

    # every rank constructs the Checkpointer and calls save/restore: they are collective
    ckpts = torchkeep.Checkpointer(run, keep_last=2, keep_best=1, monitor="loss")
    info = ckpts.restore(model=model, optimizer=optimizer)
    start = 0 if info is None else int(info.step or 0) + 1
    if rank == 0:
        print(f"{world} process(es); " + (f"resumed at step {start}" if info else "a fresh run") + f"; {run}")

    for step in range(start, args.steps):
        x, y = global_batch(step)
        per = len(x) // world
        x, y = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (step + 1) % args.save_every == 0 or step == args.steps - 1:
            ckpts.save(step, model=model, optimizer=optimizer, metrics={"loss": loss.item()})
            if rank == 0:
                print(f"step {step}: loss {loss.item():.4f}, saved {ckpts.latest}")
        if args.stop_after is not None and step >= args.stop_after:
            break
    ckpts.close()
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
