"""A process that saves checkpoints until it is killed (used by the crash test)."""

from __future__ import annotations

from multiprocessing.sharedctypes import Synchronized

import torch
from torch import nn

from torchkeep import Checkpointer

WIDTH = 700  # ~2 MB of weights: a save takes long enough to be killed in the middle


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.BatchNorm1d(WIDTH))


def fill(model: nn.Module, step: int) -> None:
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.fill_(step)


def save_forever(run_dir: str, committed: Synchronized, async_save: bool = False) -> None:  # type: ignore[type-arg]
    torch.set_num_threads(1)
    checkpointer = Checkpointer(run_dir, keep_last=3, async_save=async_save)
    model = make_model()
    info = checkpointer.restore(model=model, restore_rng=False)
    step = 0 if info is None else int(info.step or 0) + 1
    while True:
        fill(model, step)
        checkpointer.save(step, model=model, metrics={"value": float(step)})
        if async_save:
            # save() returned after a snapshot; the previous step is committed (save waited for it)
            committed.value = step - 1
            fill(model, -1)  # change the model at once: the checkpoint being written must not see it
        else:
            committed.value = step
        step += 1
