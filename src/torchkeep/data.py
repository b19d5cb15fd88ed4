"""A shuffling sampler that can resume mid-epoch."""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import Sampler

__all__ = ["ResumableSampler"]


class ResumableSampler(Sampler[int]):
    """Shuffles like ``DataLoader(shuffle=True)``, and remembers where it is.

    Each epoch's order comes from ``seed + epoch`` alone, and the sampler
    counts the indices it has handed out, so a checkpoint taken mid-epoch
    resumes with exactly the remaining samples, in the same order. It is
    :class:`Stateful`: pass it to ``Checkpointer.save(..., sampler=sampler)``.

    Exact with ``num_workers=0``. With worker processes the DataLoader
    fetches ahead of the training loop, so the count runs ahead too; use
    ``torchdata``'s ``StatefulDataLoader`` there.

    Args:
        data_source (Sized): the dataset (only its length is used).
        seed (int, default 0): the base of every epoch's shuffle.

    Example:
        >>> sampler = torchkeep.ResumableSampler(dataset, seed=0)
        >>> loader = DataLoader(dataset, batch_size=32, sampler=sampler)
    """

    def __init__(self, data_source: Sized, *, seed: int = 0) -> None:
        self.length = len(data_source)
        self.seed = seed
        self.epoch = 0
        self.position = 0

    def __len__(self) -> int:
        return self.length

    def _order(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.length, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        while self.position < self.length:
            index = order[self.position]
            self.position += 1
            yield index
        self.epoch += 1
        self.position = 0

    def state_dict(self) -> dict[str, Any]:
        """The epoch and how many samples of it were handed out."""
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position, "length": self.length}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position (the data set must have the same length)."""
        if state["length"] != self.length:
            raise ValueError(
                f"the saved sampler walked a data set of {state['length']} samples, this one has "
                f"{self.length}; resume with the same data set"
            )
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]
