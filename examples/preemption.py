"""Save on preemption: a training job that SIGTERM stops cleanly, and that resumes exactly.

Run: python examples/preemption.py [folder]

It starts the training below as a job of its own (``--train``), sends it SIGTERM
mid-epoch as a scheduler would, and checks that the job saved the step it
stopped at and exited normally, that the resumed job ends bitwise where a job
that was never stopped ends. The training alone, as a batch script runs it::

    python examples/preemption.py runs/exp1 --train --steps 2000 [--requeue]
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchkeep
from torchkeep.run.preemption import REQUEUE_EXIT_CODE


def train(run_dir: Path, *, steps: int, requeue: bool) -> int:
    """Train to ``steps`` (resuming from ``run_dir``), or until a preemption signal; the exit code."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 10, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    data = TensorDataset(x, y)
    model = nn.Sequential(nn.Linear(10, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sampler = torchkeep.ResumableSampler(data, seed=0)  # resumes mid-epoch
    loader = DataLoader(data, batch_size=32, sampler=sampler, generator=torch.Generator().manual_seed(0))

    # SIGTERM and SIGUSR1 are only recorded from here on; the loop decides when to stop
    with torchkeep.Checkpointer(run_dir, keep_last=2, preemption=True, grace_period=30) as ckpts:
        info = ckpts.restore(model=model, optimizer=optimizer, sampler=sampler)
        step = 0 if info is None else int(info.step or 0) + 1
        if ckpts.preempted:  # a signal before the first step: nothing new to save
            return REQUEUE_EXIT_CODE if requeue else 0
        while step < steps:
            for xb, yb in loader:
                loss = nn.functional.cross_entropy(model(xb), yb)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                stop = ckpts.preempted  # read once per step: the save and the break see one answer
                if step % 100 == 99 or stop or step == steps - 1:
                    ckpts.save(step, model=model, optimizer=optimizer, sampler=sampler)
                print(f"step {step} loss {loss.item():.4f}", flush=True)
                if stop:
                    print(f"{ckpts.preemption.received}: saved step {step}, stopping", flush=True)
                    return REQUEUE_EXIT_CODE if requeue else 0
                step += 1
                if step == steps:
                    break
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run_dir / "final.safetensors"))
    return 0


def _job(run_dir: Path, steps: int) -> subprocess.Popen[str]:
    command = [sys.executable, __file__, str(run_dir), "--train", "--steps", str(steps)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True)


def walkthrough(folder: Path) -> int:
    job = _job(folder / "run", 10**9)  # would train for ever
    assert job.stdout is not None
    for line in job.stdout:
        if line.startswith("step 40 "):  # mid-epoch (16 steps per epoch)
            break
    job.send_signal(signal.SIGTERM)  # what Kubernetes, a spot instance or SLURM sends
    rest, _ = job.communicate(timeout=600)  # read on: a full pipe would block the job
    last = rest.splitlines()[-1]
    print(f"preempted job: exit code {job.returncode}; {last}")
    stopped = int(last.split("saved step ")[1].split(",")[0])
    latest = torchkeep.Checkpointer(folder / "run", read_only=True).latest
    print(f"newest checkpoint: {latest}")

    until = stopped + 30
    resumed, straight = _job(folder / "run", until), _job(folder / "straight", until)
    for other in (resumed, straight):
        other.communicate(timeout=600)
    a = load_file(str(folder / "run" / "final.safetensors"))
    b = load_file(str(folder / "straight" / "final.safetensors"))
    same = all(torch.equal(a[k], b[k]) for k in b)
    print(
        f"resumed to step {until - 1}: "
        + ("bitwise equal to" if same else "DIFFERENT from")
        + " a job never stopped"
    )
    ok = job.returncode == 0 and Path(str(latest)).name == f"step-{stopped:08d}" and same
    return 0 if ok and resumed.returncode == 0 and straight.returncode == 0 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", type=Path)
    parser.add_argument("--train", action="store_true", help="run the training job itself")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--requeue", action="store_true", help=f"exit {REQUEUE_EXIT_CODE} when preempted")
    args = parser.parse_args()
    if args.train:
        return train(args.folder, steps=args.steps, requeue=args.requeue)
    if args.folder is not None:
        return walkthrough(args.folder)
    with tempfile.TemporaryDirectory() as tmp:
        return walkthrough(Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
