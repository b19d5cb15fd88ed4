"""A Checkpointer restore of a model with many small tensors, against reading its bytes.

Run: python -m benchmarks.restore_many [--tensors 2000] [--repeat 7]

The model: ``--tensors`` parameters of 32 KiB each (64 MiB for 2000), no optimizer state, saved
once by a Checkpointer (incremental, the default, and ``incremental=False``).
Measured, interleaved, medians: reading every byte of the checkpoint's files with ``readinto``
(the floor), and ``Checkpointer.restore(model=...)`` (verify every digest, read, copy into the
model). Target (issue "Speed at every size"): restore <= 1.2x the read.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import torchkeep


def build(tensors: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.ParameterList([nn.Parameter(torch.randn(8192)) for _ in range(tensors)])  # 32 KiB each


def read_all(files: list[Path]) -> float:
    start = time.perf_counter()
    for path in files:
        buffer = bytearray(path.stat().st_size)
        with path.open("rb", buffering=0) as f:
            f.readinto(buffer)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tensors", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build(args.tensors)
    with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parents[2]) as root:
        runs = {}
        for incremental in (True, False):
            run = Path(root) / f"incremental-{incremental}"
            with torchkeep.Checkpointer(run, incremental=incremental) as ckpts:
                folder = Path(ckpts.save(0, model=model))
            files = [p for p in run.rglob("*") if p.is_file() and not p.name.startswith(".")]
            runs[incremental] = (run, files)
        times: dict[str, list[float]] = {}
        for _ in range(args.repeat):
            for incremental, (run, files) in runs.items():
                times.setdefault(f"read, incremental={incremental}", []).append(read_all(files))
                target = build(args.tensors)
                start = time.perf_counter()
                torchkeep.Checkpointer(run, read_only=True).restore(model=target, restore_rng=False)
                elapsed = time.perf_counter() - start
                times.setdefault(f"restore, incremental={incremental}", []).append(elapsed)
        del folder
    med = {name: statistics.median(values) for name, values in times.items()}
    print(f"{args.tensors} tensors, {sum(p.numel() for p in model.parameters()) * 4 / 2**20:.1f} MiB")
    for incremental in (True, False):
        read, restore = med[f"read, incremental={incremental}"], med[f"restore, incremental={incremental}"]
        print(
            f"incremental={incremental}: read {read * 1e3:.1f} ms, restore {restore * 1e3:.1f} ms "
            f"= {restore / read:.2f}x the read ({restore / args.tensors * 1e6:.0f} us per tensor)"
        )


if __name__ == "__main__":
    main()
