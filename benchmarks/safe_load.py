"""torchkeep's allowlist reader against torch.load(weights_only=True), each load in a fresh process.

Run: python -m benchmarks.safe_load [--repeat 5] [--big-mib 1024] [--small-mib 100]

Two state dicts are written once with torch.save: (a) ~1 GiB in 100 float32
tensors, (b) ~100 MiB in 2000 tensors. Every load runs in a new Python
process (imports done before the clock starts), so no allocator or cache of
the reader is warm; the file itself is in the page cache (warm), as it is
for a model loaded twice. Each figure is the median of ``--repeat`` runs;
the ratio is torch's time divided by ours (above 1.00: we are faster).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

_CHILD = """
import json, sys, time
import torch
from torchkeep.safety import load_torch_file
path, reader, mmap = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
if reader == "torch":
    load = lambda: torch.load(path, weights_only=True, mmap=mmap)
else:
    load = lambda: load_torch_file(path, mmap=mmap)
start = time.perf_counter()
state = load()
loaded = time.perf_counter() - start
total = sum(float(t.view(-1)[::4096].sum()) for t in state.values())  # touch one value per 16 KiB page
touched = time.perf_counter() - start
print(json.dumps({"load": loaded, "touch": touched}))
"""


def make_state(total_mib: int, count: int) -> dict[str, torch.Tensor]:
    per = max(1, total_mib * 2**20 // 4 // count)
    g = torch.Generator().manual_seed(0)
    return {f"layer{i}.weight": torch.randn(per, generator=g) for i in range(count)}


def time_in_fresh_process(path: Path, reader: str, mmap: bool, repeat: int) -> tuple[float, float]:
    loads, touches = [], []
    for _ in range(repeat):
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, str(path), reader, "1" if mmap else "0"],
            capture_output=True,
            text=True,
            check=True,
        )
        result = json.loads(out.stdout)
        loads.append(result["load"])
        touches.append(result["touch"])
    return statistics.median(loads), statistics.median(touches)


def run(big_mib: int, small_mib: int, repeat: int) -> None:
    cases = {"(a) ~1 GiB / 100 tensors": (big_mib, 100), "(b) ~100 MiB / 2000 tensors": (small_mib, 2000)}
    with tempfile.TemporaryDirectory() as tmp:
        for title, (mib, count) in cases.items():
            path = Path(tmp) / "state.pt"
            state = make_state(mib, count)
            nbytes = sum(t.nbytes for t in state.values())
            torch.save(state, path)
            del state
            print(f"\n{title}: {count} float32 tensors, {nbytes / 2**20:.0f} MiB")
            print(f"  median of {repeat} fresh processes; page cache warm")
            header = (
                f"{'reader':<34}{'load s':>9}{'GB/s':>8}{'µs/tensor':>11}{'+touch s':>10}{'vs torch':>10}"
            )
            print(f"  {header}")
            for mmap in (False, True):
                base_load, base_touch = time_in_fresh_process(path, "torch", mmap, repeat)
                ours_load, ours_touch = time_in_fresh_process(path, "torchkeep", mmap, repeat)
                suffix = " mmap" if mmap else ""
                for name, (load, touch) in (
                    (f"torch.load weights_only{suffix}", (base_load, base_touch)),
                    (f"torchkeep reader{suffix}", (ours_load, ours_touch)),
                ):
                    print(
                        f"  {name:<34}{load:>9.3f}{nbytes / load / 1e9:>8.2f}{load / count * 1e6:>11.1f}"
                        f"{touch:>10.3f}{base_load / load:>9.2f}x"
                    )
            path.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--big-mib", type=int, default=1024)
    parser.add_argument("--small-mib", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    run(args.big_mib, args.small_mib, args.repeat)


if __name__ == "__main__":
    main()
