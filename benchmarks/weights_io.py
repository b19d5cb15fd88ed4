"""Save and load the same state dicts with torch, safetensors and torchkeep; print ratios.

Run: python -m benchmarks.weights_io [--mib 256] [--tensors 100] [--repeat 3]

Each figure is the best of ``--repeat`` runs in this process (warm page cache),
in GB/s of tensor data; the ratio column compares with torch.save/torch.load
on the same data (above 1.00 is faster than torch).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import torchkeep


def make_state(total_mib: int, count: int) -> dict[str, torch.Tensor]:
    per = max(1, total_mib * 1024 * 1024 // 4 // count)
    g = torch.Generator().manual_seed(0)
    return {f"layer{i}.weight": torch.randn(per, generator=g) for i in range(count)}


def best(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def run(total_mib: int, count: int, repeat: int) -> None:
    state = make_state(total_mib, count)
    nbytes = sum(t.nbytes for t in state.values())
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        saves: dict[str, Callable[[], object]] = {
            "torch.save": lambda: torch.save(state, d / "torch.pt"),
            "safetensors save_file": lambda: save_file(state, str(d / "st.safetensors")),
            "torchkeep .safetensors": lambda: torchkeep.save_weights(
                state, d / "tk.safetensors", durable=False
            ),
            "torchkeep .pt": lambda: torchkeep.save_weights(state, d / "tk.pt", durable=False),
            "torchkeep .safetensors durable": lambda: torchkeep.save_weights(state, d / "tkd.safetensors"),
        }
        loads: dict[str, Callable[[], object]] = {
            "torch.load weights_only": lambda: torch.load(d / "torch.pt", weights_only=True),
            "safetensors load_file": lambda: load_file(str(d / "st.safetensors")),
            "torchkeep .safetensors": lambda: torchkeep.load_weights(d / "tk.safetensors"),
            "torchkeep .pt": lambda: torchkeep.load_weights(d / "tk.pt"),
        }
        print(f"state dict: {count} float32 tensors, {nbytes / 2**20:.0f} MiB; best of {repeat}")
        for title, table, baseline in (
            ("save", saves, "torch.save"),
            ("load", loads, "torch.load weights_only"),
        ):
            timings = {name: best(fn, repeat) for name, fn in table.items()}
            print(f"\n{title:<34} {'seconds':>8} {'GB/s':>7} {'vs torch':>9}")
            for name, seconds in timings.items():
                ratio = timings[baseline] / seconds
                print(f"{name:<34} {seconds:8.3f} {nbytes / seconds / 1e9:7.2f} {ratio:8.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mib", type=int, default=256, help="total size of the state dict")
    parser.add_argument("--tensors", type=int, default=100, help="number of tensors")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (the best is kept)")
    args = parser.parse_args()
    run(args.mib, args.tensors, args.repeat)


if __name__ == "__main__":
    main()
