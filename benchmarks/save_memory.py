"""Peak extra memory of each way to save, each in a fresh process.

Run: python -m benchmarks.save_memory [--size 1GiB] [--tensors 100]

The child builds the state dict, resets the kernel's peak-RSS counter, saves
once and reports how far the resident memory rose above what the state
already took: the copies a writer makes. Page cache is not counted (it is not
resident memory of the process). Targets of the speed issue: a synchronous
save at most 64 MiB + the largest tensor; an asynchronous one one copy of the
state (its staging buffers), checked here with the same 64 MiB allowance.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

from benchmarks.run import parse_size

_CHILD = r"""
import json, os, sys, time
import torch
import torchkeep
from safetensors.torch import save_file
size, count, folder, kind = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
g = torch.Generator().manual_seed(0)
state = {f"layer{i}.weight": torch.randn(size // 4 // count, generator=g) for i in range(count)}
module = torch.nn.Module()
for i, t in enumerate(state.values()):
    module.register_buffer(f"t{i}", t)
saves = {
    "torch.save": lambda: torch.save(state, f"{folder}/a.pt"),
    "safetensors save_file": lambda: save_file(state, f"{folder}/a.safetensors"),
    "torchkeep .safetensors": lambda: torchkeep.save_weights(state, f"{folder}/b.safetensors"),
    "torchkeep .pt": lambda: torchkeep.save_weights(state, f"{folder}/b.pt"),
    "Checkpointer.save": lambda: torchkeep.Checkpointer(f"{folder}/run").save(1, model=module),
    "Checkpointer.save async": lambda: torchkeep.Checkpointer(f"{folder}/arun", async_save=True).save(
        1, model=module
    ),
}
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status("VmRSS")
saves[kind]()
time.sleep(0.5)  # an async save's writer thread is running now
print(json.dumps({"extra": max(status("VmHWM"), status("VmRSS")) - base}))
"""

KINDS = [
    "torch.save",
    "safetensors save_file",
    "torchkeep .safetensors",
    "torchkeep .pt",
    "Checkpointer.save",
    "Checkpointer.save async",
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=parse_size, default=parse_size("1GiB"))
    parser.add_argument("--tensors", type=int, default=100)
    args = parser.parse_args()
    largest = args.size // args.tensors
    print(f"{args.tensors} float32 tensors, {args.size / 2**20:.0f} MiB (largest {largest / 2**20:.1f} MiB)")
    print(f"  {'save':<28}{'peak extra RSS':>16}{'x data':>8}{'target':>13}")
    with tempfile.TemporaryDirectory() as folder:
        for kind in KINDS:
            out = subprocess.run(
                [sys.executable, "-c", _CHILD, str(args.size), str(args.tensors), folder, kind],
                capture_output=True,
                text=True,
                check=True,
            )
            extra = json.loads(out.stdout.strip().splitlines()[-1])["extra"]
            # the bounds, each with the same 64 MiB allowance for bookkeeping
            target = (64 << 20) + (args.size if "async" in kind else largest)
            print(
                f"  {kind:<28}{extra / 2**20:>13.1f} MiB{extra / args.size:>8.2f}"
                f"{'  met' if extra <= target else '  missed':>13}"
            )


if __name__ == "__main__":
    main()
