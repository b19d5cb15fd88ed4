"""A training loop that resumes exactly: run it, interrupt it (Ctrl-C), run it again.

Run: python examples/resume_training.py [run folder] [--stop-after N]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchkeep


def evaluate(model: nn.Module, data: TensorDataset) -> float:
    x, y = data.tensors
    with torchkeep.evaluating(model):
        return nn.functional.cross_entropy(model(x), y).item()


def train(run_dir: Path, *, epochs: int = 8, stop_after: int | None = None) -> list[float]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(320, 10, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()  # a learnable 3-class task
    train_set, val_set = TensorDataset(x[:256], y[:256]), TensorDataset(x[256:], y[256:])

    model = nn.Sequential(nn.Linear(10, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    sampler = torchkeep.ResumableSampler(train_set, seed=0)
    loader = DataLoader(train_set, batch_size=32, sampler=sampler, generator=torch.Generator().manual_seed(0))
    stopper = torchkeep.EarlyStopping("val_loss", patience=3)
    ckpts = torchkeep.Checkpointer(run_dir, keep_last=2, keep_best=1, monitor="val_loss")

    info = ckpts.restore(
        model=model, optimizer=optimizer, scheduler=scheduler, sampler=sampler, stopper=stopper
    )
    start = 0 if info is None else int(info.step or 0) + 1
    print("fresh run" if info is None else f"resumed after epoch {start} from {info.path.name}")
    history: list[float] = [] if info is None else list(info.extra["history"])
    for epoch in range(start, epochs):
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()
        val_loss = evaluate(model, val_set)
        history.append(val_loss)
        should_stop = stopper.step({"val_loss": val_loss})  # before save: the checkpoint holds this step
        ckpts.save(
            epoch,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            epoch=epoch,
            metrics={"val_loss": val_loss},
            extra={"history": history},
            sampler=sampler,
            stopper=stopper,
        )
        print(f"epoch {epoch + 1}: val_loss {val_loss:.4f}")
        if should_stop:
            print("early stop")
            break
        if stop_after is not None and epoch + 1 == stop_after:
            print("stopping here, as if the job was killed")
            break
    print(f"best checkpoint: {ckpts.best}")
    return history


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", nargs="?", type=Path)
    parser.add_argument("--stop-after", type=int)
    args = parser.parse_args()
    if args.run_dir is not None:
        train(args.run_dir, stop_after=args.stop_after)
    else:  # show it: one straight run, and one that stops and resumes, give the same numbers
        with tempfile.TemporaryDirectory() as tmp:
            straight = train(Path(tmp) / "straight")
            train(Path(tmp) / "resumed", stop_after=3)
            resumed = train(Path(tmp) / "resumed")
            assert resumed == straight, (resumed, straight)
            print("the interrupted run ended exactly where the straight run did")
