"""Train for a number of steps with a Checkpointer, resuming if the run folder has a checkpoint.

    python _resume_script.py RUN_DIR OUT_PREFIX STOP_AT TOTAL MODE

MODE "epoch": DataLoader(shuffle=True), stops on epoch boundaries.
MODE "sampler": DataLoader with torchkeep.ResumableSampler, may stop mid-epoch.
Writes OUT_PREFIX.losses.json (float.hex of each loss) and, when TOTAL is
reached, OUT_PREFIX.final.safetensors (model weights and optimizer state).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchkeep


def main() -> None:
    run_dir, out, stop_at, total, mode = (
        sys.argv[1],
        Path(sys.argv[2]),
        int(sys.argv[3]),
        int(sys.argv[4]),
        sys.argv[5],
    )
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g))
    model = nn.Sequential(nn.Linear(6, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.7)
    stateful = {}
    if mode == "sampler":
        sampler = torchkeep.ResumableSampler(data, seed=3)
        # the loader's own generator: creating an iterator must not draw from the global RNG
        loader = DataLoader(data, batch_size=8, sampler=sampler, generator=torch.Generator().manual_seed(0))
        stateful["sampler"] = sampler
    else:
        loader = DataLoader(data, batch_size=8, shuffle=True)
    checkpointer = torchkeep.Checkpointer(run_dir, keep_last=2)
    info = checkpointer.restore(model=model, optimizer=optimizer, scheduler=scheduler, **stateful)
    step = 0 if info is None else info.step
    losses: list[str] = [] if info is None else list(info.extra["losses"])
    model.train()
    while step < stop_at:
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            losses.append(loss.item().hex())
            if step == stop_at:
                checkpointer.save(
                    step,
                    model=model,
                    optimizer=optimizer,
                    scheduler=scheduler,
                    extra={"losses": losses},
                    **stateful,
                )
                break
    (out.parent / f"{out.name}.losses.json").write_text(json.dumps(losses))
    if step == total:
        tensors = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
        for index, state in optimizer.state_dict()["state"].items():
            for name, value in state.items():
                tensors[f"opt.{index}.{name}"] = value.reshape(-1).contiguous()
        save_file(tensors, str(out.parent / f"{out.name}.final.safetensors"))


if __name__ == "__main__":
    main()
