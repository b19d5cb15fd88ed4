"""torchkeep's safe loading against torch.load(weights_only=True), each load in a fresh process.

Run: python -m benchmarks.safe_load [--repeat 5] [--big-mib 1024] [--small-mib 100]
                                    [--baseline-src DIR]

Two state dicts are written once with torch.save: (a) ~1 GiB in 100 float32
tensors, (b) ~100 MiB in 2000 tensors. Every load runs in a new Python
process (imports done before the clock starts), so no allocator or cache of
the reader is warm; the file itself is in the page cache (warm), as it is
for a model loaded twice. ``torchkeep.load_weights`` is timed whole: deciding
the format (the sniffer) and the safety checks included. Each figure is the
median of ``--repeat`` runs; "vs torch" is torch's time divided by ours
(above 1.00: we are faster).

``--baseline-src DIR`` adds the same torchkeep loads from another checkout's
``src`` folder (e.g. ``git worktree add /tmp/base <commit>``, then
``--baseline-src /tmp/base/src``), timed in the same run, so a change can be
shown not to slow benign loads: "vs base" is the baseline's time divided by
this tree's. The readers of a row take turns, process by process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

_CHILD = """
import json, sys, time
import torch
import torchkeep
path, reader, mmap = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
if reader == "torch":
    load = lambda: torch.load(path, weights_only=True, mmap=mmap)
else:
    load = lambda: torchkeep.load_weights(path, mmap=mmap)
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


def _child_env(src: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(src), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def time_interleaved(
    readers: list[tuple[Path, str, Path | None]], mmap: bool, repeat: int
) -> list[tuple[float, float]]:
    """Medians (load, load + touch) of each (file, reader, src) over ``repeat`` fresh processes,
    the readers taking turns (the order rotating each round), so a slow minute of a shared machine
    hits them alike."""
    loads: list[list[float]] = [[] for _ in readers]
    touches: list[list[float]] = [[] for _ in readers]
    for r in range(repeat):
        for k in [(r + j) % len(readers) for j in range(len(readers))]:
            path, reader, src = readers[k]
            out = subprocess.run(
                [sys.executable, "-c", _CHILD, str(path), reader, "1" if mmap else "0"],
                capture_output=True,
                text=True,
                check=True,
                env=_child_env(src),
            )
            result = json.loads(out.stdout)
            loads[k].append(result["load"])
            touches[k].append(result["touch"])
    return [(statistics.median(a), statistics.median(b)) for a, b in zip(loads, touches, strict=True)]


def run(big_mib: int, small_mib: int, repeat: int, baseline: Path | None) -> None:
    cases = {
        f"(a) {big_mib} MiB / 100 tensors": (big_mib, 100),
        f"(b) {small_mib} MiB / 2000 tensors": (small_mib, 2000),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for title, (mib, count) in cases.items():
            state = make_state(mib, count)
            nbytes = sum(t.nbytes for t in state.values())
            files = {".pt": Path(tmp) / "state.pt", ".safetensors": Path(tmp) / "state.safetensors"}
            torch.save(state, files[".pt"])
            save_file(state, files[".safetensors"])
            del state
            print(f"\n{title}: {count} float32 tensors, {nbytes / 2**20:.0f} MiB")
            print(f"  median of {repeat} fresh processes, the readers taking turns; page cache warm")
            header = (
                f"{'reader':<52}{'load s':>9}{'GB/s':>8}{'µs/tensor':>11}{'+touch s':>10}"
                f"{'vs torch':>10}{'vs base':>9}"
            )
            print(f"  {header}")
            for suffix, path in files.items():
                for mmap in (False, True):
                    how = f"{suffix}{' mmap' if mmap else ''}"
                    readers: list[tuple[Path, str, Path | None]] = [
                        (files[".pt"], "torch", None),
                        (path, "torchkeep", None),
                    ]
                    if baseline is not None:
                        readers.append((path, "torchkeep", baseline))
                    torch_load, ours, *rest = time_interleaved(readers, mmap, repeat)
                    base = rest[0] if rest else None
                    rows = [(f"torch.load weights_only (.pt{' mmap' if mmap else ''})", torch_load, "")]
                    if base is not None:
                        rows.append((f"torchkeep.load_weights {how} (baseline)", base, ""))
                    rows.append(
                        (f"torchkeep.load_weights {how}", ours, f"{base[0] / ours[0]:>8.2f}x" if base else "")
                    )
                    for name, (load, touch), versus_base in rows:
                        print(
                            f"  {name:<52}{load:>9.3f}{nbytes / load / 1e9:>8.2f}{load / count * 1e6:>11.1f}"
                            f"{touch:>10.3f}{torch_load[0] / load:>9.2f}x{versus_base:>9}"
                        )
            for path in files.values():
                path.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--big-mib", type=int, default=1024)
    parser.add_argument("--small-mib", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--baseline-src", type=Path, default=None, help="another checkout's src/ folder to compare with"
    )
    args = parser.parse_args()
    run(args.big_mib, args.small_mib, args.repeat, args.baseline_src)


if __name__ == "__main__":
    main()
