"""Trainings that a preemption signal stops, then resumes; one process (or one rank) runs many.

Started by tests/test_preemption.py, alone or as the ranks of a gloo job
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment)::

    python _preempt_worker.py interrupt BASE FIRST COUNT   # runs FIRST .. FIRST+COUNT-1, signalled
    python _preempt_worker.py resume BASE FIRST COUNT      # finish each run; and one uninterrupted run
    python _preempt_worker.py forever RUN_DIR UNTIL OUT [requeue]  # train until UNTIL or a signal

``interrupt``: for each run, a plan drawn from ``random.Random(run)`` (see
:func:`plan`) says which rank gets which signal, in which segment of the run
(each segment is one "job": a new Checkpointer that restores and trains on),
at which step and in which phase: before the first step, inside ``restore``,
inside a training step, inside the evaluation, inside a save's snapshot, or
while an asynchronous save is in flight (its commit held until the signal
was sent). The training script sends the signal to itself
(``signal.raise_signal``), so the moment is the plan's, never the scheduler's.
Each rank appends what happened to ``BASE/interrupt-RANK.jsonl``.

``resume``: in a fresh process, restores each run's newest checkpoint and
trains it to the end, then trains one run straight through; rank 0 writes the
final weights and optimizer state (``final-N.safetensors``, ``final-ref…``) and
the loss history (``losses-N.json``, float.hex per step) for the test to compare.

``forever``: trains to step UNTIL or until ``ckpts.preempted`` (a signal
from the test), printing ``ready STEP`` after each step; exits 0, or
``REQUEUE_EXIT_CODE`` with ``requeue``; when it ran to UNTIL it writes the
final state to OUT.
"""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

import torchkeep
import torchkeep.run.checkpointer
import torchkeep.run.snapshot
from torchkeep.run.preemption import REQUEUE_EXIT_CODE

TOTAL = 12  # steps of a whole run
SAVE_EVERY = 4  # periodic saves after steps 3, 7, 11
EVAL_EVERY = 3  # evaluations after steps 2, 5, 8, 11
GLOBAL_BATCH = 8
PHASES = ("setup", "restore", "step", "eval", "save", "in_flight")


def plan(run: int, world: int) -> dict[str, Any]:
    """What run ``run`` does: ``{"async": bool, "segments": n, "signals": {rank: [signal, ...]}}``.

    A signal is ``{"segment", "phase", "after", "name"}``: it is sent in that segment at the
    first step at least ``after`` steps past the segment's start where the phase happens
    (``setup`` and ``restore`` happen once, before the first step).
    """
    rng = random.Random(run)
    segments = rng.choice((1, 1, 2))
    use_async = rng.random() < 0.5
    phases = [p for p in PHASES if p != "in_flight" or use_async]
    # on 2 ranks: one rank only (one node preempted), both at once, or each at its own moment
    targets = [[0]] if world == 1 else rng.choice(([[0]], [[1]], [[0, 1]], [[0], [1]]))
    signals: dict[int, list[dict[str, Any]]] = {rank: [] for rank in range(world)}
    for segment in range(segments):
        for ranks in targets:
            phase = rng.choice(phases if segment > 0 else [p for p in phases if p != "restore"])
            entry = {"segment": segment, "phase": phase, "after": rng.randrange(6), "name": ""}
            entry["name"] = rng.choice(("SIGTERM", "SIGTERM", "SIGUSR1"))
            for rank in ranks:
                signals[rank].append(dict(entry))
    return {"async": use_async, "segments": segments, "signals": signals}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))


def batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, 6, generator=g)
    y = torch.randint(0, 3, (GLOBAL_BATCH,), generator=g)
    per = GLOBAL_BATCH // world
    return x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]


class Trigger:
    """Sends this process a signal when the training reaches a planned moment."""

    def __init__(self, signals: list[dict[str, Any]]) -> None:
        self.pending = list(signals)
        self.fired: list[dict[str, Any]] = []
        self.segment = 0
        self.start = 0
        self.step = -1

    def at(self, phase: str) -> None:
        for entry in self.pending:
            if entry["segment"] != self.segment or entry["phase"] != phase:
                continue
            if phase not in ("setup", "restore") and self.step < self.start + entry["after"]:
                continue
            self.pending.remove(entry)
            self.fired.append({**entry, "step": self.step})
            # to this thread: raise_signal runs the Python handler before it returns
            signal.raise_signal(getattr(signal, entry["name"]))
            return


class Probe:
    """A Stateful riding in every checkpoint; its restore is the "restore" phase."""

    def __init__(self, trigger: Trigger) -> None:
        self.trigger = trigger

    def state_dict(self) -> dict[str, Any]:
        return {"probe": 1}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert state == {"probe": 1}
        self.trigger.at("restore")


class Gate:
    """Holds background commits, each until the main thread releases it (the "in flight" moment).

    One event per held save, in save order: a commit takes the oldest one when it starts, and a
    release that comes before the commit got there still lets it pass (no clear-and-reuse race).
    """

    def __init__(self) -> None:
        self.held: collections.deque[threading.Event] = collections.deque()

    def hold(self) -> threading.Event:
        """Hold the commit of the next save; set the event returned to let it go."""
        release = threading.Event()
        self.held.append(release)
        return release

    def wrap(self, commit: Callable[..., Any]) -> Callable[..., Any]:
        def gated(*args: Any, **kwargs: Any) -> Any:
            if self.held:
                self.held.popleft().wait()
            return commit(*args, **kwargs)

        return gated


def _install_hooks(trigger_of: Callable[[], Trigger], gate: Gate) -> None:
    capture_rng = torchkeep.run.snapshot.capture_rng_state

    def capture_rng_and_signal() -> dict[str, object]:
        trigger_of().at("save")  # inside save(): the snapshot is being taken
        return capture_rng()

    torchkeep.run.snapshot.capture_rng_state = capture_rng_and_signal  # type: ignore[assignment]
    torchkeep.run.checkpointer.commit = gate.wrap(torchkeep.run.checkpointer.commit)  # type: ignore[assignment]


def train_segment(
    run_dir: Path, trigger: Trigger, gate: Gate, *, use_async: bool, rank: int, world: int
) -> dict[str, Any]:
    """One job of a run: restore, train until preempted or done. Returns what happened."""
    model: nn.Module = make_model()
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.02)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.5)
    torch.manual_seed(100 + rank)  # each rank's own dropout
    probe = Probe(trigger)
    with torchkeep.Checkpointer(run_dir, keep_last=2, async_save=use_async, preemption=True) as ckpts:
        trigger.step = -1
        trigger.at("setup")
        info = ckpts.restore(model=model, optimizer=optimizer, scheduler=scheduler, probe=probe)
        start = 0 if info is None else int(info.step or 0) + 1
        trigger.start = start
        losses: list[str] = [] if info is None else list(info.extra["losses"])
        if ckpts.preempted:  # before the first step: nothing new to save
            return {"exit": "before_first_step", "start": start, "stopped": None}
        stopped = None
        for step in range(start, TOTAL):
            trigger.step = step
            model.train()
            x, y = batch(step, rank, world)
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            trigger.at("step")
            optimizer.step()
            scheduler.step()
            losses.append(loss.item().hex())
            if step % EVAL_EVERY == EVAL_EVERY - 1:
                with torchkeep.evaluating(model):
                    xv, yv = batch(10_000 + step, rank, world)
                    nn.functional.cross_entropy(model(xv), yv)
                    trigger.at("eval")
            stop = ckpts.preempted  # once per step, on every rank: the same answer everywhere
            if step % SAVE_EVERY == SAVE_EVERY - 1 or stop:
                release = gate.hold() if use_async else None  # its commit waits for the moment
                ckpts.save(
                    step,
                    model=model,
                    optimizer=optimizer,
                    scheduler=scheduler,
                    extra={"losses": losses},
                    probe=probe,
                )
                if release is not None:
                    trigger.at("in_flight")
                    release.set()
            if stop:
                stopped = step
                break
    return {"exit": "preempted" if stopped is not None else "completed", "start": start, "stopped": stopped}


def interrupt(base: Path, first: int, count: int, rank: int, world: int) -> None:
    trigger = Trigger([])
    gate = Gate()
    _install_hooks(lambda: trigger, gate)
    with (base / f"interrupt-{rank}.jsonl").open("a") as log:
        for run in range(first, first + count):
            todo = plan(run, world)
            trigger = Trigger(todo["signals"][rank])
            segments = []
            for segment in range(todo["segments"]):
                trigger.segment = segment
                result = train_segment(
                    base / f"run-{run}", trigger, gate, use_async=todo["async"], rank=rank, world=world
                )
                latest = torchkeep.Checkpointer(base / f"run-{run}", read_only=True).latest
                result["latest"] = None if latest is None else Path(latest).name
                segments.append(result)
                if result["exit"] == "completed":
                    break
            record = {"run": run, "plan": todo, "fired": trigger.fired, "segments": segments}
            log.write(json.dumps(record) + "\n")
            log.flush()


def finish(run_dir: Path, rank: int, world: int) -> tuple[nn.Module, torch.optim.Optimizer, list[str]]:
    """Restore ``run_dir``'s newest checkpoint (if any) and train to the end, without signals."""
    model: nn.Module = make_model()
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.02)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.5)
    torch.manual_seed(100 + rank)
    probe = Probe(Trigger([]))
    with torchkeep.Checkpointer(run_dir, keep_last=2) as ckpts:
        info = ckpts.restore(model=model, optimizer=optimizer, scheduler=scheduler, probe=probe)
        start = 0 if info is None else int(info.step or 0) + 1
        losses: list[str] = [] if info is None else list(info.extra["losses"])
        for step in range(start, TOTAL):
            model.train()
            x, y = batch(step, rank, world)
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item().hex())
            if step % EVAL_EVERY == EVAL_EVERY - 1:
                with torchkeep.evaluating(model):
                    xv, yv = batch(10_000 + step, rank, world)
                    nn.functional.cross_entropy(model(xv), yv)
    return model, optimizer, losses


def _final_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    tensors = {f"model.{k}": v.detach().clone().contiguous() for k, v in module.state_dict().items()}
    for index, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            tensors[f"opt.{index}.{name}"] = torch.as_tensor(value).reshape(-1).clone()
    tensors["rng"] = torch.get_rng_state()  # the random state goes on exactly too
    return tensors


def resume(base: Path, first: int, count: int, rank: int, world: int) -> None:
    for run in [*range(first, first + count), "ref"]:
        run_dir = base / f"run-{run}" if run != "ref" else base / "reference"
        model, optimizer, losses = finish(run_dir, rank, world)
        tensors = _final_tensors(model, optimizer)
        save_file(tensors, str(base / f"final-{run}-{rank}.safetensors"))
        if rank == 0:
            (base / f"losses-{run}.json").write_text(json.dumps(losses))


def forever(run_dir: Path, until: int, out: Path, requeue: bool) -> int:
    """Train to step ``until`` or until a signal from outside: the script a job would run.

    Prints ``ready STEP`` after each step; when done (not preempted) writes the final state to ``out``.
    """
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.02)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.5)
    torch.manual_seed(100)
    with torchkeep.Checkpointer(run_dir, keep_last=2, preemption=True) as ckpts:
        info = ckpts.restore(model=model, optimizer=optimizer, scheduler=scheduler)
        start = 0 if info is None else int(info.step or 0) + 1
        for step in range(start, until):
            model.train()
            x, y = batch(step % 50, 0, 1)
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            stop = ckpts.preempted
            if step % 25 == 24 or stop or step == until - 1:
                ckpts.save(step, model=model, optimizer=optimizer, scheduler=scheduler)
            print(f"ready {step}", flush=True)
            if stop:
                print(f"preempted by {ckpts.preemption.received}: saved step {step}", flush=True)
                return REQUEUE_EXIT_CODE if requeue else 0
    save_file(_final_tensors(model, optimizer), str(out))
    return 0


def main() -> int:
    torch.set_num_threads(1)
    command = sys.argv[1]
    if command == "forever":
        run_dir, until, out = Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
        return forever(run_dir, until, out, requeue=sys.argv[5:] == ["requeue"])
    base, first, count = Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    try:
        if command == "interrupt":
            interrupt(base, first, count, rank, world)
        else:
            resume(base, first, count, rank, world)
    finally:
        if distributed:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
