"""One rank of a torch.distributed job (gloo, CPU) that trains, checkpoints and resumes.

Started by tests/test_distributed.py the way torchrun starts ranks (RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment), or in a single
process without those. Usage::

    python _dist_worker.py SCENARIO RUN_DIR OUT_DIR [options as key=value]

Scenarios:
    ddp     DDP training, a checkpoint every step; resumes from RUN_DIR.
    fsdp    FSDP2 (fully_shard) training, a checkpoint every step; resumes from RUN_DIR.
    fail    DDP or FSDP saves where one rank raises during the save of step 2.

Every rank's data is its slice of one global batch per step, drawn from a
generator seeded by the step, so runs on any number of ranks see the same
global batches. DDP ranks also add noise from the *global* RNG to their
inputs, so an exact resume needs every rank's own random state back.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import torchkeep

GLOBAL_BATCH = 8
DIM = 12


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(DIM, 16), nn.Tanh(), nn.Linear(16, 4))


def batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, DIM, generator=g)
    y = torch.randn(GLOBAL_BATCH, 4, generator=g)
    per = GLOBAL_BATCH // world
    return x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]


def options(argv: list[str]) -> dict[str, str]:
    return dict(arg.split("=", 1) for arg in argv)


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if dist.is_initialized():
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train(scenario: str, run_dir: str, out: Path, opts: dict[str, str]) -> None:
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    steps = int(opts.get("steps", "6"))
    sleep = float(opts.get("sleep", "0"))
    sharded = opts.get("mode", scenario) == "fsdp"
    model: nn.Module = make_model()
    if sharded and distributed:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    elif distributed:
        model = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    torch.manual_seed(100 + rank)  # after make_model's seed: each rank draws its own noise
    if opts.get("rank0_only") == "1":  # the habit from DDP tutorials: only rank 0 touches checkpoints
        if rank == 0:
            alone = torchkeep.Checkpointer(run_dir, distributed=False)
        for step in range(int(opts.get("steps", "3"))):
            x, y = batch(step, rank, world)
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
            if rank == 0:
                alone.save(step, model=model, optimizer=optimizer)
        dist.destroy_process_group()
        return
    ckpts = torchkeep.Checkpointer(
        run_dir, keep_last=int(opts.get("keep_last", "3")), async_save=opts.get("async") == "1"
    )
    restore_path = opts.get("restore")
    info = ckpts.restore(model=model, optimizer=optimizer, path=restore_path)
    start = 0 if info is None else int(info.step or 0) + 1
    if info is not None and rank == 0:
        restored = {k: v.clone() for k, v in full_state(model).items()}
        torch.save(restored, out / f"restored-{world}.pt")
    elif info is not None:
        full_state(model)  # collective under FSDP
    losses = []
    for step in range(start, steps):
        x, y = batch(step, rank, world)
        if not sharded:
            x = x + 0.1 * torch.randn_like(x)  # global RNG: differs per rank
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        loss = loss.detach()
        optimizer.step()
        losses.append(loss.item())
        if scenario == "fail" and step == int(opts["fail_step"]):
            _break_rank(int(opts["fail_rank"]), rank, opts.get("fail_how", "snapshot"))
            try:
                ckpts.save(step, model=model, optimizer=optimizer, metrics={"loss": loss.item()})
            except torchkeep.DistributedSaveError as err:
                (out / f"error-{rank}.json").write_text(
                    json.dumps({"failed": err.failed, "stage": err.stage})
                )
                dist.destroy_process_group()
                return
            raise AssertionError("the save should have failed")
        ckpts.save(step, model=model, optimizer=optimizer, metrics={"loss": loss.item()})
        if rank == 0:
            (out / "progress").write_text(str(step))
        time.sleep(sleep)
    ckpts.close()
    final = full_state(model)
    if rank == 0:
        torch.save(final, out / f"final-{world}.pt")
    (out / f"losses-{world}-{rank}.json").write_text(json.dumps({"start": start, "losses": losses}))
    if distributed:
        dist.destroy_process_group()


def _break_rank(fail_rank: int, rank: int, how: str) -> None:
    if rank != fail_rank:
        return
    if how == "snapshot":
        import torchkeep.run.snapshot

        def broken() -> dict[str, object]:
            raise RuntimeError("injected failure while taking the snapshot")

        torchkeep.run.snapshot.capture_rng_state = broken  # type: ignore[assignment]
    else:  # in the middle of DCP writing this rank's shard file
        import torch.distributed.checkpoint.filesystem as fs

        def broken_write(*args: object, **kwargs: object) -> object:
            raise OSError(28, "No space left on device (injected)")

        fs._write_item = broken_write  # type: ignore[assignment]


if __name__ == "__main__":
    torch.set_num_threads(1)
    train(sys.argv[1], sys.argv[2], Path(sys.argv[3]), options(sys.argv[4:]))
