"""An EMA of the weights that rides in the run's checkpoints, and a soup of the last checkpoints.

The README's "EMA and averaging" example, with its paths under one folder, run twice: once
straight through, and once in another run folder interrupted after step 150 (as a crash would:
the progress since the step-99 checkpoint is lost) and run again, which resumes from step 99.
Both runs must end with the same EMA, live weights and soup, bit for bit: the EMA's average and
update count, the model, the optimizer and the random streams all came back from the checkpoint.

Run: python examples/ema_and_soup.py [output folder]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

import torchkeep

STEPS = 300


class Interrupted(Exception):
    """Raised by the first half of the interrupted run, as a crash would end it."""


def loss_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return (model(x) - x.sum(1, keepdim=True)).pow(2).mean()


def train_and_average(out: Path, *, stop_after: int | None = None) -> tuple[float, float, float]:
    """The README's example; returns the validation losses of the EMA, the live weights and the soup.

    Raises:
        Interrupted: after step ``stop_after`` (if given), before the run's end.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ema = torchkeep.EMA(model, decay=0.99, warmup=True)  # after loading weights or replacing a head

    with torchkeep.Checkpointer(out / "runs" / "ema", keep_last=3) as ckpts:
        info = ckpts.restore(model=model, optimizer=optimizer, ema=ema)  # None on a fresh run
        for step in range(0 if info is None else info.step + 1, STEPS):
            loss = loss_of(model, torch.randn(64, 8))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            ema.update()  # after each optimizer step
            if step % 100 == 99:
                ckpts.save(step, model=model, optimizer=optimizer, ema=ema)
            if step == stop_after:
                raise Interrupted(f"stopped after step {step}")

    x_val = torch.randn(512, 8, generator=torch.Generator().manual_seed(1))
    with ema.applied(model), torchkeep.evaluating(model):  # the average in; the live weights back after
        ema_loss = loss_of(model, x_val).item()
    with torchkeep.evaluating(model):
        live_loss = loss_of(model, x_val).item()
    torchkeep.save_weights(ema, out / "model-ema.safetensors")  # keys exactly as in model.state_dict()

    # a soup of the run's last checkpoints, weighted, written to one file
    steps = sorted((out / "runs" / "ema").glob("step-*"))
    soup = torchkeep.average(steps, out / "soup.safetensors", weights=[1, 1, 2])
    model.load_state_dict(soup)
    torch.optim.swa_utils.update_bn([torch.randn(64, 8) for _ in range(20)], model)  # BN stats of the soup
    with torchkeep.evaluating(model):
        soup_loss = loss_of(model, x_val).item()
    return ema_loss, live_loss, soup_loss


def main(out: Path) -> None:
    straight = train_and_average(out / "straight")
    print("validation loss: EMA {:.4f}, live weights {:.4f}, soup {:.4f}".format(*straight))
    assert straight[0] < straight[1], "the EMA should beat the last weights on this problem"
    try:
        train_and_average(out / "resumed", stop_after=150)
        raise AssertionError("the first half of the interrupted run went on to the end")
    except Interrupted as stop:
        print(f"interrupted run: {stop}; its last checkpoint is step 99")
    resumed = train_and_average(out / "resumed")  # resumes at step 100, replays 100..150 and goes on
    assert resumed == straight, (straight, resumed)
    ema_files = [
        torchkeep.load_weights(out / run / "model-ema.safetensors") for run in ("straight", "resumed")
    ]
    assert all(torch.equal(ema_files[0][k], ema_files[1][k]) for k in ema_files[0]), "EMA weights differ"
    print("resumed from step 99: the same EMA, live weights and soup, bit for bit")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
