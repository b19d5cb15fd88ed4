"""A process that saves checkpoints until it is killed (used by the crash test).

The model has a part that changes at every save and a frozen part that never does: the
frozen part is written by the run's first save only and shared by every later checkpoint
(retention removes that first checkpoint while its pack must stay).
"""

from __future__ import annotations

from multiprocessing.sharedctypes import Synchronized

import torch
from torch import nn

from torchkeep import Checkpointer

WIDTH = 700  # ~2 MB of weights: a save takes long enough to be killed in the middle


def make_model() -> nn.Module:
    torch.manual_seed(0)  # the frozen part is the same in every process
    return nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.BatchNorm1d(WIDTH), nn.Linear(WIDTH, 64))


def _changing(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.startswith("2.")}


def fill(model: nn.Module, step: int) -> None:
    with torch.no_grad():
        for tensor in _changing(model).values():
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
    """Start a saver, SIGKILL it at a random moment, check that the newest committed step survived
    and that readers see only whole checkpoints; repeat.

    Even rounds kill ``window`` seconds after the start, whatever the saver is doing by then
    (starting, restoring, taking the lock, cleaning up, saving). Odd rounds first wait for the
    saver to commit a new step, however long a loaded machine takes, then kill it up to
    ``window[1]`` seconds later, so the run always makes progress without depending on timing.

    Returns:
        The newest step committed in the last round.
    """
    import multiprocessing
    import random
    import time

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "torchkeep", "_crash_worker"])
    committed = context.Value("q", -1)
    rng = random.Random(1234)
    for round_ in range(rounds):
        process = context.Process(target=save_forever, args=(run_dir, committed, async_save, storage_options))
        before = committed.value
        process.start()
        if round_ % 2:
            for _ in range(60_000):  # 10 min at most: a saver that never commits fails below
                if committed.value > before or not process.is_alive():
                    break
                time.sleep(0.01)
            assert committed.value > before, "the saver committed nothing in 10 minutes"
            process.join(timeout=rng.uniform(0.0, window[1]))
        else:
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
        for tensor in _changing(model).values():
            assert torch.all(tensor == info.step), "restored a checkpoint that is not the one committed"
        frozen = make_model()[2]
        assert torch.equal(model[2].weight, frozen.weight), "the shared frozen part was not restored"
        # every tensor of every kept checkpoint, shared packs included, checked against its digest
        assert all(entry.valid for entry in ckpts.list(verify=True)), "a kept checkpoint is not whole"
    return int(committed.value)
