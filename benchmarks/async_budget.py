"""Asynchronous saves: the stall of ``save()`` against one copy of the state, with and without a
staging budget, and a training loop's step time while a background save runs.

Run: python -m benchmarks.async_budget [--repeat 5] [--threads 1]

Model: torchvision resnet50 (10 classes), every parameter trained with SGD momentum, so the
state is the weights plus as much momentum (about 180 MiB), on the CPU. Durable saves. Figures:

- *one copy*: cloning every tensor of the state (what staging costs at best);
- *stall*: the time ``Checkpointer(async_save=True).save()`` takes to return, with no budget
  (the state fits) and with ``staging_budget`` at a quarter of the state (the rest is written
  before ``save()`` returns; said once in a log line);
- *step time*: a training step (batch 8, 64x64) measured alone, and while a background save of
  the previous step's state is being written (the steps that overlap it).

Medians of ``--repeat`` rounds, configurations interleaved. Results: printed, and
benchmarks/results/async_budget.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import torchkeep

RESULTS = Path(__file__).parent / "results" / "async_budget.json"


def build() -> tuple[nn.Module, torch.optim.Optimizer]:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=10)
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def step(model: nn.Module, optimizer: torch.optim.Optimizer) -> float:
    start = time.perf_counter()
    loss = model(torch.randn(8, 3, 64, 64)).logsumexp(1).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    tensors = list(model.state_dict().values())
    for state in optimizer.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return sum(t.nbytes for t in tensors)


def one_copy(model: nn.Module, optimizer: torch.optim.Optimizer) -> float:
    start = time.perf_counter()
    copies = [t.clone() for t in model.state_dict().values()]
    for state in optimizer.state.values():
        copies += [v.clone() for v in state.values() if isinstance(v, torch.Tensor)]
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tmp-dir", default=str(Path(__file__).resolve().parents[2]))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, optimizer = build()
    step(model, optimizer)
    size = state_bytes(model, optimizer)
    budget = size // 4
    root = Path(tempfile.mkdtemp(prefix="torchkeep-bench-async-", dir=args.tmp_dir))
    copies: list[float] = []
    stalls: dict[str, list[float]] = {"no budget": [], "budget 1/4": []}
    alone: list[float] = []
    overlapped: list[float] = []
    try:
        runs = {
            "no budget": torchkeep.Checkpointer(root / "a", async_save=True, keep_last=1),
            "budget 1/4": torchkeep.Checkpointer(
                root / "b", async_save=True, keep_last=1, staging_budget=budget
            ),
        }
        for ckpts in runs.values():  # first saves allocate the buffers and write every tensor
            ckpts.save(0, model=model, optimizer=optimizer)
            ckpts.wait()
        for round_ in range(1, args.repeat + 1):
            copies.append(one_copy(model, optimizer))
            for name, ckpts in runs.items():
                step(model, optimizer)
                start = time.perf_counter()
                ckpts.save(round_, model=model, optimizer=optimizer)
                stalls[name].append(time.perf_counter() - start)
                if name == "no budget":  # train while it writes; then the same steps alone
                    during = []
                    pending = True
                    while pending:
                        during.append(step(model, optimizer))
                        pending = ckpts._pending is not None and not ckpts._pending[1].done()
                    ckpts.wait()
                    overlapped += during
                    alone += [step(model, optimizer) for _ in during]
                else:
                    ckpts.wait()
        for ckpts in runs.values():
            ckpts.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    copy = statistics.median(copies)
    report: dict[str, Any] = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), "
        f"torch {torch.__version__}",
        "state_mib": size / 2**20,
        "budget_mib": budget / 2**20,
        "one_copy_s": copy,
        "stall_s": {name: statistics.median(values) for name, values in stalls.items()},
        "step_alone_s": statistics.median(alone),
        "step_during_save_s": statistics.median(overlapped),
        "steps_overlapped": len(overlapped),
    }
    report["stall_vs_copy"] = {name: s / copy for name, s in report["stall_s"].items()}
    report["step_slowdown"] = report["step_during_save_s"] / report["step_alone_s"]
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=1) + "\n")
    print(
        f"state {report['state_mib']:.1f} MiB, budget {report['budget_mib']:.1f} MiB; "
        f"one copy {copy * 1e3:.1f} ms"
    )
    for name, value in report["stall_s"].items():
        print(f"stall, {name}: {value * 1e3:.1f} ms = {report['stall_vs_copy'][name]:.2f}x one copy")
    print(
        f"step alone {report['step_alone_s'] * 1e3:.1f} ms, during a background save "
        f"{report['step_during_save_s'] * 1e3:.1f} ms ({len(overlapped)} steps): "
        f"{report['step_slowdown']:.2f}x"
    )


if __name__ == "__main__":
    main()
