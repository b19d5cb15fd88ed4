"""The benchmark suite: saves and loads side by side against raw I/O, torch and safetensors.

Run: python -m benchmarks.run [--size 512MiB] [--small SIZE/8] [--repeat 5] [--dir DIR] [--no-plot]

Three state dicts: (a) SIZE (default 512 MiB) in 100 float32 tensors, (b) SMALL
(default SIZE/8: 64 MiB) in 2000 tensors, (c) torchvision's resnet50 (random weights). Saves run in this
process; every load runs in a fresh Python process (imports done before the
clock starts), so nothing of the reader is warm, while the file is in the page
cache (warm) as for a file just written. Figures are medians of ``--repeat``
runs. Ratios: "vs raw" compares with writing / reading the same bytes with
plain system calls (raw + fsync for durable saves), "vs torch" with
torch.save / torch.load(weights_only=True); above 1.00 is faster.

Results go to benchmarks/results/run-SIZE.json, a table to
benchmarks/README.md, and a bar chart to benchmarks/results/run-SIZE.png
(with matplotlib: pip install torchkeep[bench]).
"""

from __future__ import annotations

import argparse
import datetime
import json
import mmap
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

import torchkeep
from torchkeep.storage.atomic import wait_for_discards

HERE = Path(__file__).parent
RESULTS = HERE / "results"

# -- data ---------------------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMG]i?B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1GiB, 256MiB)")
    unit = (match.group(2) or "B").upper().replace("I", "")
    return int(float(match.group(1)) * {"B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30}[unit])


def random_state(total: int, count: int) -> dict[str, torch.Tensor]:
    per = max(1, total // 4 // count)
    g = torch.Generator().manual_seed(0)
    return {f"layer{i}.weight": torch.randn(per, generator=g) for i in range(count)}


def resnet50_state() -> dict[str, torch.Tensor] | None:
    try:
        from torchvision.models import resnet50
    except ImportError:
        return None
    torch.manual_seed(0)
    return dict(resnet50(weights=None).state_dict())


class Holder(torch.nn.Module):
    """A module whose state dict is the given tensors (what Checkpointer.save takes)."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for i, tensor in enumerate(state.values()):
            self.register_buffer(f"t{i}", tensor)


# -- saves ----------------------------------------------------------------------------------------------


def _views(state: dict[str, torch.Tensor]) -> list[memoryview]:
    return [t.reshape(-1).view(torch.uint8).numpy().data for t in state.values() if t.numel()]


def _settle() -> None:
    """Before every timed save: what happens between two real checkpoints, minutes apart.

    The previous file's old copy is freed and every dirty page is written back;
    without this, a save right after a save waits for the kernel to flush the
    previous gigabyte (dirty-page throttling) and measures the disk, not the code.
    """
    wait_for_discards()
    os.sync()
    time.sleep(0.1)


def _remove(path: Path) -> Callable[[], None]:
    def remove() -> None:
        path.unlink(missing_ok=True)
        _settle()

    return remove


def _raw_write(path: Path, state: dict[str, torch.Tensor], *, fsync: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for view in _views(state):
            os.write(fd, view)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


SaveOp = tuple[Callable[[], object], str, Callable[[], object] | None]


def save_ops(state: dict[str, torch.Tensor], folder: Path) -> dict[str, SaveOp]:
    """name -> (operation, which baseline it is compared with, what to do before each run, untimed)."""
    holder = Holder(state)
    # standalone checkpoints: an incremental run would write nothing for a state that did not change
    sync = torchkeep.Checkpointer(folder / "run-sync", keep_last=1, incremental=False)
    background = torchkeep.Checkpointer(folder / "run-async", keep_last=1, async_save=True, incremental=False)
    step = {"sync": 0, "async": 0}

    def sync_save() -> None:
        step["sync"] += 1
        sync.save(step["sync"], model=holder)

    def async_stall() -> None:
        step["async"] += 1
        background.save(step["async"], model=holder)

    return {
        "memory copy (clone)": (lambda: {k: v.clone() for k, v in state.items()}, "memory", _settle),
        # raw writes go to a new file each time (the old one is deleted before the clock starts),
        # so they pay neither truncation nor freeing of the old pages: the plain cost of writing
        "raw write": (
            lambda: _raw_write(folder / "raw.bin", state, fsync=False),
            "raw",
            _remove(folder / "raw.bin"),
        ),
        "raw write + fsync": (
            lambda: _raw_write(folder / "rawf.bin", state, fsync=True),
            "raw+fsync",
            _remove(folder / "rawf.bin"),
        ),
        "torch.save": (lambda: torch.save(state, folder / "torch.pt"), "raw", _settle),
        "safetensors save_file": (lambda: save_file(state, str(folder / "st.safetensors")), "raw", _settle),
        "torchkeep .safetensors": (
            lambda: torchkeep.save_weights(state, folder / "tk.safetensors", durable=False),
            "raw",
            _settle,
        ),
        "torchkeep .safetensors durable": (
            lambda: torchkeep.save_weights(state, folder / "tkd.safetensors"),
            "raw+fsync",
            _settle,
        ),
        "torchkeep .pt": (
            lambda: torchkeep.save_weights(state, folder / "tk.pt", durable=False),
            "raw",
            _settle,
        ),
        "torchkeep .pt durable": (
            lambda: torchkeep.save_weights(state, folder / "tkd.pt"),
            "raw+fsync",
            _settle,
        ),
        "Checkpointer.save (durable, standalone)": (sync_save, "raw+fsync", _settle),
        # the training stall: until save() returns; the previous write finishes outside the clock,
        # as it does behind the training steps between two checkpoints
        "Checkpointer.save async: stall (standalone)": (
            async_stall,
            "memory",
            lambda: (background.wait(), _settle()),
        ),
    }


def time_runs(
    op: Callable[[], object], repeat: int, prepare: Callable[[], object] | None
) -> tuple[float, float]:
    """Median and minimum of ``repeat`` timed runs of ``op`` (after one untimed run)."""
    op()  # once unmeasured: allocations, staging buffers, first file creation
    times = []
    for _ in range(repeat):
        if prepare is not None:
            prepare()
        start = time.perf_counter()
        op()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


# -- loads (each in a fresh process) ---------------------------------------------------------------

_CHILD = r"""
import json, resource, sys, time
import torch
torch.set_num_threads(1)  # OpenMP spin-waits on a shared 2-core machine made the touch pass vary 20 ms..2 s
import torchkeep
from safetensors.torch import load_file
kind, path = sys.argv[1], sys.argv[2]
def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
try:  # reset the peak to now, so imports do not count
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass
def raw():
    import os
    size = os.path.getsize(path)
    buffer = torch.empty(size, dtype=torch.uint8)
    view = buffer.numpy().data
    with open(path, "rb", buffering=0) as f:
        done = 0
        while done < size:
            done += f.readinto(view[done:done + (64 << 20)])
    return {"all": buffer}
loads = {
    "raw readinto": raw,
    "torch.load weights_only": lambda: torch.load(path, weights_only=True),
    "torch.load weights_only mmap": lambda: torch.load(path, weights_only=True, mmap=True),
    "safetensors load_file": lambda: load_file(path),
    "torchkeep lazy": lambda: torchkeep.load_weights(path, mmap=True),
    "torchkeep eager": lambda: torchkeep.load_weights(path, mmap=False),
}
base = status("VmRSS")
start = time.perf_counter()
state = loads[kind]()
loaded = time.perf_counter() - start
for t in state.values():
    if t.numel():
        t.reshape(-1).view(torch.uint8).max()  # every byte read once
touched = time.perf_counter() - start
print(json.dumps({"load": loaded, "touch": touched, "rss": max(status("VmHWM"), status("VmRSS")) - base}))
"""


def load_ops(files: dict[str, Path]) -> dict[str, tuple[str, Path]]:
    return {
        "raw readinto": ("raw readinto", files["pt"]),
        "torch.load weights_only": ("torch.load weights_only", files["pt"]),
        "torch.load weights_only mmap": ("torch.load weights_only mmap", files["pt"]),
        "safetensors load_file": ("safetensors load_file", files["st"]),
        "torchkeep .safetensors lazy": ("torchkeep lazy", files["st"]),
        "torchkeep .safetensors eager": ("torchkeep eager", files["st"]),
        "torchkeep .pt lazy": ("torchkeep lazy", files["pt"]),
        "torchkeep .pt eager": ("torchkeep eager", files["pt"]),
        "torchkeep .pt eager (its own .pt)": ("torchkeep eager", files["tk_pt"]),
    }


def fresh_load(kind: str, path: Path, repeat: int) -> dict[str, float]:
    runs = []
    for _ in range(repeat):
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, kind, str(path)], capture_output=True, text=True, check=True
        )
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    found = {key: statistics.median(r[key] for r in runs) for key in ("load", "touch", "rss")}
    found["touch_min"] = min(r["touch"] for r in runs)
    return found


def restore_vs_read(
    state: dict[str, torch.Tensor], run: Path, repeat: int, **options: Any
) -> dict[str, float]:
    """Save ``state`` once into a new run, then time ``Checkpointer.restore`` (verify every digest,
    read, copy into the model) against reading every byte of the files the checkpoint uses;
    interleaved, medians, in this process."""
    with torchkeep.Checkpointer(run, **options) as ckpts:
        folder = Path(ckpts.save(1, model=Holder(state)))
    holder = Holder({k: torch.empty_like(v) for k, v in state.items()})
    reader = torchkeep.Checkpointer(run, read_only=True)
    used = [p for p in folder.iterdir() if p.is_file()]
    index = folder / "tensors.json"
    if index.exists():
        used += [run / ref for ref in set(json.loads(index.read_text())["packs"].values())]
    warm = {path: mmap.mmap(-1, max(1, path.stat().st_size)) for path in used}
    restores, reads, copies = [], [], []
    for _ in range(repeat + 1):
        start = time.perf_counter()  # into new memory (fresh pages), as any loader must
        for path in used:
            with mmap.mmap(-1, max(1, path.stat().st_size)) as buffer, path.open("rb", buffering=0) as f:
                f.readinto(buffer)
        reads.append(time.perf_counter() - start)
        start = time.perf_counter()  # into memory already there (as the model's is): the copy alone
        for path in used:
            with path.open("rb", buffering=0) as f:
                f.readinto(warm[path])
        copies.append(time.perf_counter() - start)
        start = time.perf_counter()
        reader.restore(model=holder, restore_rng=False)
        restores.append(time.perf_counter() - start)
    for buffer in warm.values():
        buffer.close()
    read, restored = statistics.median(reads[1:]), statistics.median(restores[1:])
    copy = statistics.median(copies[1:])
    return {"restore": restored, "read": read, "ratio": restored / read, "copy": copy}


# -- one data set -------------------------------------------------------------------------------------


def run_case(name: str, state: dict[str, torch.Tensor], folder: Path, repeat: int) -> dict[str, Any]:
    nbytes = sum(t.nbytes for t in state.values())
    print(f"\n== {name}: {len(state)} tensors, {nbytes / 2**20:.0f} MiB; median of {repeat}")
    ops = save_ops(state, folder)
    timed = {op_name: time_runs(op, repeat, prepare) for op_name, (op, _, prepare) in ops.items()}
    saves = {op_name: median for op_name, (median, _) in timed.items()}
    ops["Checkpointer.save async: stall (standalone)"][2]()  # type: ignore[misc]  # let the last write finish
    baselines = {
        "raw": saves["raw write"],
        "raw+fsync": saves["raw write + fsync"],
        "memory": saves["memory copy (clone)"],
    }
    save_rows = []
    print(f"  {'save':<34}{'s':>8}{'GB/s':>8}{'vs raw':>9}{'vs torch':>10}")
    for op_name, (_, baseline, _) in ops.items():
        seconds = saves[op_name]
        row = {
            "op": op_name,
            "seconds": seconds,
            "gb_per_s": nbytes / seconds / 1e9,
            "baseline": baseline,
            "vs_baseline": baselines[baseline] / seconds,
            "vs_torch": saves["torch.save"] / seconds,
            "min_seconds": timed[op_name][1],
        }
        save_rows.append(row)
        print(
            f"  {op_name:<34}{seconds:>8.3f}{row['gb_per_s']:>8.2f}{row['vs_baseline']:>8.2f}x"
            f"{row['vs_torch']:>9.2f}x   (vs {baseline})"
        )
    restore = restore_vs_read(state, folder / "run-restore", repeat)
    standalone = restore_vs_read(state, folder / "run-restore-standalone", repeat, incremental=False)
    for kind, r in (("", restore), (" (standalone)", standalone)):
        print(
            f"  Checkpointer.restore{kind} {r['restore']:.3f} s, reading its files {r['read']:.3f} s: "
            f"{r['ratio']:.2f}x (into memory already there: {r['copy']:.3f} s)"
        )
    files = {"pt": folder / "torch.pt", "st": folder / "tk.safetensors", "tk_pt": folder / "tk.pt"}
    load_rows = []
    results = {op: fresh_load(kind, path, repeat) for op, (kind, path) in load_ops(files).items()}
    raw, torch_load = results["raw readinto"], results["torch.load weights_only"]
    header = f"{'load (fresh process)':<34}{'s':>8}{'GB/s':>8}{'vs raw':>9}{'vs torch':>10}{'+touch s':>10}"
    print(f"  {header}{'RSS x':>7}")
    for op_name, r in results.items():
        row = {
            "op": op_name,
            "seconds": r["load"],
            "touch_seconds": r["touch"],
            "gb_per_s": nbytes / r["load"] / 1e9,
            "vs_raw": raw["load"] / r["load"],
            "vs_torch": torch_load["load"] / r["load"],
            "peak_rss_bytes": r["rss"],
            "peak_rss_ratio": r["rss"] / nbytes,
            "us_per_tensor": r["load"] / len(state) * 1e6,
            "touch_min_seconds": r["touch_min"],
        }
        load_rows.append(row)
        print(
            f"  {op_name:<34}{r['load']:>8.3f}{row['gb_per_s']:>8.2f}{row['vs_raw']:>8.2f}x"
            f"{row['vs_torch']:>9.2f}x{r['touch']:>10.3f}{row['peak_rss_ratio']:>7.2f}"
        )
    for path in folder.iterdir():  # free the disk before the next data set
        if path.is_file():
            path.unlink()
        else:
            shutil.rmtree(path)
    return {
        "name": name,
        "tensors": len(state),
        "bytes": nbytes,
        "save": save_rows,
        "load": load_rows,
        "restore": restore,
        "restore_standalone": standalone,
    }


# -- reports -----------------------------------------------------------------------------------------


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"Measured {report['date']} on {report['machine']} (torch {report['torch']}), "
        f"`python -m benchmarks.run --size {report['size']} --small {report['small']}`; medians of "
        f"{report['repeat']}; page cache warm. Peak RSS: extra resident memory of the loading process "
        "after every byte was touched (mapped file pages count once touched).",
        "",
        '**Targets** of the issue "Speed at every size" (the async rows from the latest '
        '`benchmarks.async_budget` run; the scale curve: "How it scales" below)',
        "",
        targets_markdown(report["targets"]),
        "",
    ]
    for case in report["cases"]:
        lines += [
            f"**{case['name']}** ({case['tensors']} tensors, {case['bytes'] / 2**20:.0f} MiB)",
            "",
            "| save | s | GB/s | vs raw | vs torch.save |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for r in case["save"]:
            lines.append(
                f"| {r['op']} | {r['seconds']:.3f} | {r['gb_per_s']:.2f} | {r['vs_baseline']:.2f}x "
                f"({r['baseline']}) | {r['vs_torch']:.2f}x |"
            )
        lines += [
            "",
            "| load, fresh process | s | GB/s | vs raw | vs torch.load | +touch all s | peak RSS / data |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in case["load"]:
            lines.append(
                f"| {r['op']} | {r['seconds']:.3f} | {r['gb_per_s']:.2f} | {r['vs_raw']:.2f}x | "
                f"{r['vs_torch']:.2f}x | {r['touch_seconds']:.3f} | {r['peak_rss_ratio']:.2f} |"
            )
        restore, standalone = case["restore"], case["restore_standalone"]
        lines += [
            "",
            f"`Checkpointer.restore` of this state (saved once): {restore['restore']:.3f} s, reading the "
            f"files it uses into new memory {restore['read']:.3f} s ({restore['ratio']:.2f}x; into memory "
            f"already there {restore['copy']:.3f} s); standalone "
            f"(`incremental=False`): {standalone['restore']:.3f} s against {standalone['read']:.3f} s "
            f"({standalone['ratio']:.2f}x).",
            "",
        ]
    return "\n".join(lines)


def _row(case: dict[str, Any], kind: str, op: str) -> dict[str, Any]:
    return next(r for r in case[kind] if r["op"] == op)


def targets(report: dict[str, Any]) -> list[tuple[str, str, float, str, bool]]:
    """The targets of the issue "Speed at every size" this run measures: (what, figures, ratio, goal,
    held); saves and loads as the issue measured them, the fastest of ``--repeat`` runs. The
    scale curve and the async budget have benchmarks of their own (benchmarks.scale,
    benchmarks.async_budget); their latest results are read from benchmarks/results."""
    rows: list[tuple[str, str, float, str, bool]] = []
    for case in report["cases"][:2]:
        short = case["name"].split(" ")[0]
        raw = _row(case, "save", "raw write + fsync")["min_seconds"]
        torch_save = _row(case, "save", "torch.save")["min_seconds"]
        for fmt in (".safetensors", ".pt"):
            ours = _row(case, "save", f"torchkeep {fmt} durable")["min_seconds"]
            rows.append(
                (
                    f"{short} durable save_weights {fmt} vs raw write + fsync",
                    f"{ours * 1e3:.0f} ms vs {raw * 1e3:.0f} ms",
                    raw / ours,
                    ">= 0.90",
                    raw / ours >= 0.9,
                )
            )
            rows.append(
                (
                    f"{short} durable save_weights {fmt} vs torch.save (no fsync)",
                    f"{ours * 1e3:.0f} ms vs {torch_save * 1e3:.0f} ms",
                    torch_save / ours,
                    ">= 1.00",
                    torch_save / ours >= 1.0,
                )
            )
    small = report["cases"][1]
    theirs = _row(small, "load", "torch.load weights_only")["touch_min_seconds"]
    ours = _row(small, "load", "torchkeep .pt eager")["touch_min_seconds"]
    rows.append(
        (
            f"(b) load .pt of {small['tensors']} tensors, bytes touched, vs torch.load(weights_only=True)",
            f"{ours * 1e3:.0f} ms vs {theirs * 1e3:.0f} ms",
            theirs / ours,
            ">= 2.50",
            theirs / ours >= 2.5,
        )
    )
    restore = small["restore"]
    rows.append(
        (
            f"(b) Checkpointer.restore of {small['tensors']} tensors vs reading its files into new memory",
            f"{restore['restore'] * 1e3:.0f} ms vs {restore['read'] * 1e3:.0f} ms "
            f"(the copy alone: {restore['copy'] * 1e3:.0f} ms)",
            restore["ratio"],
            "<= 1.20",
            restore["ratio"] <= 1.2,
        )
    )
    budget = RESULTS / "async_budget.json"
    if budget.exists():
        found = json.loads(budget.read_text())
        rows.append(
            (
                "async save: stall with the state within the budget vs one copy (benchmarks.async_budget)",
                f"{found['stall_s']['no budget'] * 1e3:.0f} ms vs {found['one_copy_s'] * 1e3:.0f} ms",
                found["stall_vs_copy"]["no budget"],
                "<= 1.10",
                found["stall_vs_copy"]["no budget"] <= 1.1,
            )
        )
        rows.append(
            (
                "async save: training step during a background save (benchmarks.async_budget)",
                f"{found['step_during_save_s'] * 1e3:.0f} ms vs {found['step_alone_s'] * 1e3:.0f} ms",
                found["step_slowdown"],
                "<= 1.10",
                found["step_slowdown"] <= 1.1,
            )
        )
    return rows


def targets_markdown(rows: list[tuple[str, str, float, str, bool]]) -> str:
    lines = ["| target | measured | ratio | goal | |", "| --- | --- | ---: | --- | --- |"]
    for what, figures, ratio, goal, held in rows:
        lines.append(f"| {what} | {figures} | {ratio:.2f} | {goal} | {'held' if held else '**missed**'} |")
    return "\n".join(lines)


def write_readme_section(text: str) -> None:
    readme = HERE / "README.md"
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    body = readme.read_text() if readme.exists() else f"# Benchmarks\n\n{start}\n{end}\n"
    if start not in body:
        body += f"\n{start}\n{end}\n"
    head, rest = body.split(start, 1)
    tail = rest.split(end, 1)[1]
    readme.write_text(f"{head}{start}\n{text}\n{end}{tail}")


def plot(report: dict[str, Any], target: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install torchkeep[bench]): no chart drawn")
        return False
    cases = report["cases"]
    fig, axes = plt.subplots(len(cases), 2, figsize=(15, 4.2 * len(cases)), squeeze=False)
    for row, case in enumerate(cases):
        for col, kind in enumerate(("save", "load")):
            ax = axes[row][col]
            ops = [r for r in case[kind] if r["op"] != "memory copy (clone)"]
            names = [r["op"] for r in ops]
            speeds = [r["gb_per_s"] for r in ops]
            colors = ["#2b7bba" if "torchkeep" in n or "Checkpointer" in n else "#999999" for n in names]
            ax.barh(names, speeds, color=colors)
            ax.invert_yaxis()
            ax.set_xscale("log")
            ax.set_xlabel("GB/s (log scale; higher is better)")
            ax.set_title(f"{kind}: {case['name']}", fontsize=10)
            for i, value in enumerate(speeds):
                ax.text(value, i, f" {value:.2f}", va="center", fontsize=8)
    fig.suptitle(f"torchkeep vs raw I/O, torch and safetensors ({report['machine']})", fontsize=11)
    fig.tight_layout()
    fig.savefig(target, dpi=90)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--size", type=parse_size, default=parse_size("512MiB"), help="size of state dict (a) (512MiB)"
    )
    parser.add_argument(
        "--small", type=parse_size, default=None, help="size of state dict (b) (default: SIZE / 8)"
    )
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to write the files (default: a temp dir)"
    )
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--no-save", action="store_true", help="print only; write no result files")
    args = parser.parse_args()
    small = args.small or args.size // 8
    label = f"{args.size / 2**30:g}GiB" if args.size >= 2**30 else f"{args.size / 2**20:g}MiB"
    cases = {
        f"(a) {label} in 100 tensors": random_state(args.size, 100),
        f"(b) {small / 2**20:.0f}MiB in 2000 tensors": random_state(small, 2000),
    }
    resnet = resnet50_state()
    if resnet is not None:
        cases["(c) resnet50 state dict"] = resnet
    report: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_implementation()} "
        f"{platform.python_version()}",
        "torch": str(torch.__version__),
        "size": label,
        "small": f"{small / 2**20:g}MiB",
        "repeat": args.repeat,
        "cases": [],
    }
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for name, state in cases.items():
            report["cases"].append(run_case(name, state, Path(tmp), args.repeat))
    report["targets"] = targets(report)
    print("\n" + targets_markdown(report["targets"]))
    if args.no_save:
        return
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"run-{label}.json").write_text(json.dumps(report, indent=1))
    write_readme_section(markdown(report))
    if not args.no_plot and plot(report, RESULTS / f"run-{label}.png"):
        print(f"chart: {RESULTS / f'run-{label}.png'}")
    print(f"results: {RESULTS / f'run-{label}.json'}, table: {HERE / 'README.md'}")


if __name__ == "__main__":
    main()
