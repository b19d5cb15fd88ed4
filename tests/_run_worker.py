"""Child processes for the concurrency tests: a run's writer, its readers, a lock holder.

python _run_worker.py write RUN STEPS WIDTH [KEEP]
                                                save STEPS checkpoints (keeping the last KEEP);
                                                after the first, say "ready" and wait for a line
                                                on stdin. The first layer is frozen, so every
                                                checkpoint shares its tensors in the run's packs
python _run_worker.py read RUN KIND COUNT DONE  KIND: ls | verify | best | reader; up to COUNT
                                                times, stopping early once the file DONE
                                                exists; says "started" after the first
python _run_worker.py hold RUN                  save once, print its pid, wait for stdin to close
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

import torchkeep
from torchkeep.cli import main
from torchkeep.run import RunReader


def _model(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, 2))


def write(run: str, steps: int, width: int, keep: int | None) -> None:
    model = _model(width)
    torchkeep.freeze(model[0])  # written once, used by every checkpoint
    optimizer = torch.optim.SGD(torchkeep.trainable(model), lr=0.1, momentum=0.9)
    with torchkeep.Checkpointer(run, monitor="loss", keep_last=keep) as ckpts:
        for step in range(steps):
            model(torch.randn(4, width)).square().mean().backward()
            optimizer.step()
            ckpts.save(step, model=model, optimizer=optimizer, metrics={"loss": 1.0 / (step + 1)})
            if step == 0:
                print("ready", flush=True)
                sys.stdin.readline()  # the parent says "go" once every reader is reading
    print("done", flush=True)


def _cli(args: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main(args)
            code = 0
        except SystemExit as exit:
            code = int(exit.code or 0)
    return code, out.getvalue()


def read(run: str, kind: str, count: int, done: str) -> None:
    failures: list[str] = []
    runs = overlapping = 0
    for _ in range(count):
        finished = Path(done).exists()
        if kind == "ls":
            code, out = _cli(["ls", run, "--json"])
            ok = code == 0 and all(row["valid"] for row in json.loads(out))
        elif kind == "verify":
            code, out = _cli(["verify", run])
            ok = code == 0
        elif kind == "best":
            best = torchkeep.Checkpointer(run, monitor="loss", read_only=True).best
            ok, out = best is not None, str(best)
        else:
            entries = RunReader(run).entries(verify=True)
            ok, out = bool(entries) and all(e.valid for e in entries), str(entries)
        runs += 1
        overlapping += not finished
        if runs == 1:
            print("started", flush=True)
        if not ok:
            failures.append(out[-500:])
        if finished:
            break
    print(json.dumps({"runs": runs, "overlapping": overlapping, "failures": failures}), flush=True)


def hold(run: str) -> None:
    with torchkeep.Checkpointer(run) as ckpts:
        ckpts.save(0, model=_model(4))
        print(json.dumps({"pid": os.getpid()}), flush=True)
        sys.stdin.read()  # until the parent closes it (or kills this process)


if __name__ == "__main__":
    command, *rest = sys.argv[1:]
    if command == "write":
        write(rest[0], int(rest[1]), int(rest[2]), int(rest[3]) if len(rest) > 3 else None)
    elif command == "read":
        read(rest[0], rest[1], int(rest[2]), rest[3])
    else:
        hold(rest[0])
