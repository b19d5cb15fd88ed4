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


def save_forever(
    run_dir: str,
    committed: Synchronized,  # type: ignore[type-arg]
    async_save: bool = False,
    storage_options: dict[str, str] | None = None,
) -> None:
    torch.set_num_threads(1)
    checkpointer = Checkpointer(run_dir, keep_last=3, async_save=async_save, storage_options=storage_options)
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


def crash_rounds(
    run_dir: str,
    rounds: int,
    *,
    async_save: bool = False,
    storage_options: dict[str, str] | None = None,
    window: tuple[float, float] = (0.05, 0.6),
) -> int:
    """Start a saver, SIGKILL it at a random moment (``window`` seconds after its start), check that
    the newest committed step survived and that readers see only whole checkpoints; repeat.

    Returns:
        The newest step committed in the last round.
    """
    import multiprocessing
    import random

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "torchkeep", "_crash_worker"])
    committed = context.Value("q", -1)
    rng = random.Random(1234)
    for _ in range(rounds):
        process = context.Process(target=save_forever, args=(run_dir, committed, async_save, storage_options))
        process.start()
        process.join(timeout=rng.uniform(*window))
        process.kill()  # SIGKILL: no cleanup, no atexit
        process.join()
        newest = committed.value
        if newest < 0:
            continue
        model = make_model()
        ckpts = Checkpointer(run_dir, keep_last=3, storage_options=storage_options)
        info = ckpts.restore(model=model, restore_rng=False)
        assert info is not None
        assert info.step is not None
        assert info.step >= newest, "a committed checkpoint was lost"
        for tensor in model.state_dict().values():
            assert torch.all(tensor == info.step), "restored a checkpoint that is not the one committed"
        assert all(entry.valid for entry in ckpts.list()), "a reader saw a checkpoint that is not whole"
    return int(committed.value)
