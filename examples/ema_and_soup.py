"""An EMA of the weights that rides in the run's checkpoints, and a soup of the last checkpoints.

The README's "EMA and averaging" example, with its paths under one folder. It runs twice over the
same run folder: the second time resumes at the end and must give the same numbers.

Run: python examples/ema_and_soup.py [output folder]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

import torchkeep


def loss_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return (model(x) - x.sum(1, keepdim=True)).pow(2).mean()


def train_and_average(out: Path) -> tuple[float, float, float]:
    """The README's example; returns the validation losses of the EMA, the live weights and the soup."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ema = torchkeep.EMA(model, decay=0.99, warmup=True)  # after loading weights or replacing a head

    with torchkeep.Checkpointer(out / "runs" / "ema", keep_last=3) as ckpts:
        info = ckpts.restore(model=model, optimizer=optimizer, ema=ema)  # None on a fresh run
        for step in range(0 if info is None else info.step + 1, 300):
            loss = loss_of(model, torch.randn(64, 8))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            ema.update()  # after each optimizer step
            if step % 100 == 99:
                ckpts.save(step, model=model, optimizer=optimizer, ema=ema)

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
    first = train_and_average(out)
    print("validation loss: EMA {:.4f}, live weights {:.4f}, soup {:.4f}".format(*first))
    assert first[0] < first[1], "the EMA should beat the last weights on this problem"
    again = train_and_average(out)  # restores the last checkpoint (step 299): nothing left to train
    assert again[:2] == first[:2], (first, again)
    print("resumed at the end: the same numbers")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
