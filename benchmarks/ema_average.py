"""EMA update time and averaging memory, side by side.

Run: python -m benchmarks.ema_average [--device cuda] [--sources 4] [--size 256MiB]

(1) The time of one EMA update of resnet50 (161 tensors, 25.6 M values) on
``--device``: ``torchkeep.EMA.update`` against timm's ``ModelEmaV3.update``,
``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn`` and a
plain per-tensor loop (``mul_`` + ``add_``). Medians of 50 updates after 5
warm-ups (synchronised on a GPU).

(2) The peak extra resident memory of averaging ``--sources`` safetensors
files of ``--size`` each, each way in a fresh process: ``torchkeep.average``
(one source at a time, float64 accumulators) against loading every source
and averaging with ``torch.stack(...).mean(0)``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch

from benchmarks.run import parse_size

_CHILD = r"""
import json, sys, torch, torchkeep
kind, paths = sys.argv[1], sys.argv[2:]
def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status("VmRSS")
if kind == "torchkeep.average":
    out = torchkeep.average(paths)
elif kind == "torchkeep.average float32":
    out = torchkeep.average(paths, accumulate_dtype=torch.float32)
else:
    states = [torchkeep.load_weights(p, mmap=False) for p in paths]
    out = {k: torch.stack([s[k] for s in states]).mean(0) for k in states[0]}
print(json.dumps({"extra": max(status("VmHWM"), status("VmRSS")) - base}))
"""


def _interleaved(ways: dict[str, Callable[[], object]], device: str, repeat: int = 50) -> dict[str, float]:
    """Median seconds of each way, run round-robin so that machine load hits every way alike."""
    for fn in ways.values():
        for _ in range(5):
            fn()
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(repeat):
        for name, fn in ways.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_update(device: str) -> dict[str, float]:
    """Median seconds of one EMA update of resnet50, each way."""
    import torchvision

    import torchkeep

    model = torchvision.models.resnet50().to(device)
    ema = torchkeep.EMA(model, decay=0.999)
    ways: dict[str, Callable[[], object]] = {"torchkeep EMA.update": ema.update}
    try:
        from timm.utils.model_ema import ModelEmaV3

        timm_ema = ModelEmaV3(model, decay=0.999)
        ways["timm ModelEmaV3.update"] = lambda: timm_ema.update(model)
    except ImportError:
        pass
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.999), use_buffers=True)
    ways["swa_utils AveragedModel"] = lambda: averaged.update_parameters(model)
    shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def loop() -> None:
        for key, value in model.state_dict().items():
            if value.is_floating_point():
                shadow[key].mul_(0.999).add_(value, alpha=0.001)
            else:
                shadow[key].copy_(value)

    ways["per-tensor loop (mul_ + add_)"] = loop
    return _interleaved(ways, device)


def bench_memory(sources: int, size: int) -> list[tuple[str, int]]:
    """Peak extra RSS of averaging ``sources`` files of ``size`` bytes, each way, fresh process each."""
    import torchkeep

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(sources):
            g = torch.Generator().manual_seed(i)
            state = {f"layer{j}.weight": torch.randn(size // 4 // 20, generator=g) for j in range(20)}
            paths.append(str(torchkeep.save_weights(state, f"{tmp}/{i}.safetensors")))
            del state
        for kind in ("torchkeep.average", "torchkeep.average float32", "load all + stack.mean"):
            done = subprocess.run(
                [sys.executable, "-c", _CHILD, kind, *paths], capture_output=True, text=True, check=True
            )
            rows.append((kind, int(json.loads(done.stdout.strip().splitlines()[-1])["extra"])))
    return rows


def main() -> None:
    """Print both tables."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sources", type=int, default=4)
    parser.add_argument("--size", default="256MiB")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    rows = bench_update(args.device)
    ours = rows["torchkeep EMA.update"]
    print(f"## One EMA update of resnet50 on {args.device} (median of 50, ways interleaved)\n")
    print("| way | ms | its time / torchkeep's |\n| --- | ---: | ---: |")
    for name, seconds in rows.items():
        print(f"| {name} | {seconds * 1e3:.2f} | {seconds / ours:.2f}x |")
    if args.skip_memory:
        return
    size = parse_size(args.size)
    mem = bench_memory(args.sources, size)
    print(f"\n## Averaging {args.sources} files of {args.size} (float32): peak extra RSS\n")
    print("| way | MiB | x one source |\n| --- | ---: | ---: |")
    for name, extra in mem:
        print(f"| {name} | {extra / 2**20:.0f} | {extra / size:.2f}x |")


if __name__ == "__main__":
    main()
