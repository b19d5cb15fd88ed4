"""The "saving and loading models" tutorial, with torchkeep.

Run: python examples/save_and_load.py [output folder]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

import torchkeep


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2))
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def main(out: Path) -> None:
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(256, 8), torch.randint(0, 3, (256,))
    epochs = 5
    for _ in range(epochs):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(torchkeep.summarize(model))

    # 1. weights: the recommended way
    torchkeep.save_weights(model, out / "net.safetensors")
    restored = Net()
    print(torchkeep.load_into(restored, out / "net.safetensors"))

    # 2. the whole model, loadable without the Net class
    torchkeep.save_model(model, out / "net.pt2", example_inputs=(x[:2],))
    portable = torchkeep.load_model(out / "net.pt2")

    # 3. a checkpoint to resume training
    torchkeep.save_checkpoint(out / "ckpt.tar", model=model, optimizer=optimizer, epoch=epochs - 1, loss=loss)
    resumed = Net()
    resumed_opt = torch.optim.SGD(resumed.parameters(), lr=0.1, momentum=0.9)
    info = torchkeep.load_checkpoint(out / "ckpt.tar", model=resumed, optimizer=resumed_opt)
    print(f"resume at epoch {info.epoch + 1} (loss was {info.loss:.4f})")

    # inference: eval mode for every copy, training flags restored afterwards
    with torchkeep.evaluating(model), torchkeep.evaluating(restored), torchkeep.evaluating(resumed):
        expected = model(x[:2])
        for copy in (restored, portable, resumed):
            assert torch.equal(copy(x[:2]), expected)
    print("all copies predict the same")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
