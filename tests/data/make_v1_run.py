"""How tests/data/v1_run was made: run once at commit f1dc140 (format version 1), from the repository root.

Kept for the record; the folder it wrote is the fixture, so it never has to run again.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

import torchkeep


class TiedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.out = nn.Linear(4, 10, bias=False)
        self.out.weight = self.embed.weight


def main() -> None:
    torch.manual_seed(0)
    m = TiedNet()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    m.out(m.embed(torch.tensor([1, 2]))).sum().backward()
    opt.step()
    out = Path("tests/data/v1_run")
    shutil.rmtree(out, ignore_errors=True)
    c = torchkeep.Checkpointer(out, monitor="val_loss")
    c.save(1, model=m, optimizer=opt, epoch=0, metrics={"val_loss": 0.5})
    c.save(2, model=m, optimizer=opt, epoch=1, metrics={"val_loss": 0.7}, extra={"note": "v1"})
    torch.save({"embed.weight": m.embed.weight.detach().clone()}, "tests/data/v1_run_expected.pt")


if __name__ == "__main__":
    main()
