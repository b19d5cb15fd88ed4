"""How saves and loads scale with size: time and peak memory from 64 MiB to 8 GiB, and 100k tensors.

Run: python -m benchmarks.scale [--sizes 64MiB,512MiB,4GiB,8GiB|none] [--many 100000] [--repeat 3]
                                [--dir DIR] [--no-plot] [--no-save] [--replot]
     (the many-tensor case alone, in about a minute: --sizes none --repeat 1 --no-save)

Every measurement runs in a fresh Python process (imports done before the
clock starts). A save's process builds the state dict (100 float32 tensors
of SIZE/100, or ``--many`` tensors of 1 KiB), resets its peak-RSS counter, and
saves once; a load's process loads the file the save wrote (page cache warm)
and then reads every byte. Peak extra RSS is the high-water mark of resident
memory above what the process held before the operation (Linux
``/proc/self/clear_refs``), so a save's figure is its own buffers, not the
state dict, and a load's figure includes the tensors it returns; a lazy
(memory-mapped) load is also measured before any byte is touched.

For the ``--many`` case a floor is measured beside the loads: a process
that merely builds the same dict of tensors in memory (``torch.empty`` each,
filled). What it holds above the data is the tensors' own objects (a Python
tensor, its TensorImpl and StorageImpl, an allocation each, the dict); an
eager load that returns those tensors cannot hold less.
``--repeat`` runs for sizes up to 1 GiB, one above (a 8 GiB save takes
seconds; its noise is small against that); figures are minima.

Results go to benchmarks/results/scale.json, a table in benchmarks/README.md
(between the scale markers) and a picture, benchmarks/results/scale.png.
Big files are deleted as soon as they were read.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.run import parse_size

HERE = Path(__file__).parent
RESULTS = HERE / "results"

# name -> (file suffix, what it does); the file a save writes is what the loads of that format read
SAVES = {
    "raw write + fsync": "raw",
    "torch.save": "torch.pt",
    "safetensors save_file": "st.safetensors",
    "torchkeep .safetensors (durable)": "tk.safetensors",
    "torchkeep .pt (durable)": "tk.pt",
}
LOADS = {
    "raw readinto": "raw",
    "torch.load weights_only": "torch.pt",
    "safetensors load_file": "st.safetensors",
    "torchkeep .safetensors eager": "tk.safetensors",
    "torchkeep .safetensors lazy": "tk.safetensors",
    "torchkeep .pt eager": "tk.pt",
    "torchkeep .pt lazy": "tk.pt",
}

# no file: the process builds the state dict itself (the --many case only)
FLOOR = "floor: build the same dict in memory"

_CHILD = r"""
import json, os, sys, time
import torch
torch.set_num_threads(1)  # OpenMP spin-waits on a shared 2-core machine made the touch pass vary 20 ms..2 s
import torchkeep
from safetensors.torch import load_file, save_file

role, op, path, total, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])

def field(name):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
    return 0

def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass

def raw_write(state):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for t in state.values():
            if t.numel():
                os.write(fd, t.reshape(-1).view(torch.uint8).numpy().data)
        os.fsync(fd)
    finally:
        os.close(fd)

def raw_read():
    size = os.path.getsize(path)
    buffer = torch.empty(size, dtype=torch.uint8)
    view = buffer.numpy().data
    with open(path, "rb", buffering=0) as f:
        done = 0
        while done < size:
            done += f.readinto(view[done:done + (64 << 20)])
    return {"all": buffer}

def build():
    per = max(1, total // 4 // count)
    return {f"layer{i}.weight": torch.empty(per).fill_(i % 251) for i in range(count)}

if role == "save":
    state = build()
    saves = {
        "raw write + fsync": lambda: raw_write(state),
        "torch.save": lambda: torch.save(state, path),
        "safetensors save_file": lambda: save_file(state, path),
        "torchkeep .safetensors (durable)": lambda: torchkeep.save_weights(state, path),
        "torchkeep .pt (durable)": lambda: torchkeep.save_weights(state, path),
    }
    os.sync()
    base = field("VmRSS")
    reset_peak()
    start = time.perf_counter()
    saves[op]()
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "rss": max(field("VmHWM"), field("VmRSS")) - base}))
else:
    loads = {
        "raw readinto": raw_read,
        "torch.load weights_only": lambda: torch.load(path, weights_only=True),
        "safetensors load_file": lambda: load_file(path),
        "torchkeep .safetensors eager": lambda: torchkeep.load_weights(path, mmap=False),
        "torchkeep .safetensors lazy": lambda: torchkeep.load_weights(path, mmap=True),
        "torchkeep .pt eager": lambda: torchkeep.load_weights(path, mmap=False),
        "torchkeep .pt lazy": lambda: torchkeep.load_weights(path, mmap=True),
        "floor: build the same dict in memory": build,
    }
    base = field("VmRSS")
    reset_peak()
    start = time.perf_counter()
    state = loads[op]()
    loaded = time.perf_counter() - start
    rss_loaded = max(field("VmHWM"), field("VmRSS")) - base
    for t in state.values():
        if t.numel():
            t.reshape(-1).view(torch.uint8).max()  # every byte read once
    touched = time.perf_counter() - start
    rss = max(field("VmHWM"), field("VmRSS")) - base
    print(json.dumps({"seconds": loaded, "touch_seconds": touched, "rss_loaded": rss_loaded, "rss": rss}))
"""


def _child(role: str, op: str, path: Path, total: int, count: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, role, op, str(path), str(total), str(count)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode:
        raise RuntimeError(f"{role} {op} failed:\n{out.stderr[-2000:]}")
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _best(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: min(r[key] for r in runs) for key in runs[0]}


def _available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


def run_size(label: str, total: int, count: int, folder: Path, repeat: int) -> dict[str, Any]:
    runs = repeat if total <= 1 << 30 else 1
    print(f"\n== {label}: {count} tensors, {total / 2**20:.0f} MiB; min of {runs}, fresh process each")
    case: dict[str, Any] = {"label": label, "bytes": total, "tensors": count, "save": {}, "load": {}}
    # each format is saved, loaded and deleted before the next: two files of 8 GiB do not both fit in
    # the page cache of a 24 GiB machine, and a load must find its file warm
    for op, suffix in SAVES.items():
        path = folder / suffix
        # safetensors' save_file may hold a second copy of the state; the others stream it
        need = total * (3 if op == "safetensors save_file" else 2)
        if need > 0.85 * _available():
            print(f"  save {op:<36} skipped: needs ~{need / 2**30:.0f} GiB of memory")
        else:
            result = _best([_child("save", op, path, total, count) for _ in range(runs)])
            case["save"][op] = result
            print(
                f"  save {op:<36}{result['seconds']:8.3f} s {total / result['seconds'] / 1e9:6.2f} GB/s"
                f"   peak extra RSS {result['rss'] / 2**20:8.1f} MiB"
            )
        for load_op, load_suffix in LOADS.items():
            if load_suffix != suffix:
                continue
            if not path.exists() or 1.2 * total > 0.85 * _available():  # the file itself is reclaimable cache
                print(f"  load {load_op:<36} skipped")
                continue
            result = _best([_child("load", load_op, path, total, count) for _ in range(runs)])
            case["load"][load_op] = result
            print(
                f"  load {load_op:<36}{result['seconds']:8.3f} s (+touch {result['touch_seconds']:7.3f} s)"
                f"   peak extra RSS / data {result['rss'] / total:5.2f}"
                f" (before touching {result['rss_loaded'] / total:5.2f})"
            )
        path.unlink(missing_ok=True)
    if count > 100:
        result = _best([_child("load", FLOOR, folder / "none", total, count) for _ in range(runs)])
        case["load"][FLOOR] = result
        per_tensor = (result["rss"] - total) / count
        print(
            f"  {FLOOR:<41}{result['seconds']:8.3f} s (+touch {result['touch_seconds']:7.3f} s)"
            f"   peak extra RSS / data {result['rss'] / total:5.2f}"
            f" ({per_tensor:.0f} bytes a tensor above its data)"
        )
    return case


# -- reports -------------------------------------------------------------------------------------


def _linearity(cases: list[dict[str, Any]], kind: str, op: str, key: str) -> str:
    """Seconds per GiB at the largest size against the smallest size at least 512 MiB: 1.00 = linear."""
    points = [(c["bytes"], c[kind][op][key]) for c in cases if op in c[kind] and c["tensors"] == 100]
    points = [(b, s) for b, s in points if b >= 512 << 20]
    if len(points) < 2:
        return "n/a"
    (b0, s0), (b1, s1) = points[0], points[-1]
    return f"{(s1 / b1) / (s0 / b0):.2f}"


def _save_cell(r: dict[str, float], nbytes: int) -> str:
    return f"{r['seconds']:.3f} s ({nbytes / r['seconds'] / 1e9:.2f} GB/s), RSS +{r['rss'] / 2**20:.0f} MiB"


def _load_cell(r: dict[str, float], nbytes: int, *, lazy: bool) -> str:
    seconds = r["touch_seconds"]
    text = f"{seconds:.3f} s ({nbytes / seconds / 1e9:.2f} GB/s), RSS {r['rss'] / nbytes:.2f}x"
    if lazy:
        text += f" (+{r['rss_loaded'] / 2**20:.0f} MiB untouched)"
    return text


def markdown(report: dict[str, Any]) -> str:
    cases = report["cases"]
    lines = [
        f"Measured {report['date']} on {report['machine']} (torch {report['torch']}), "
        f"`python -m benchmarks.scale`; fresh process per figure, page cache warm. Seconds (GB/s); "
        "RSS: peak extra resident memory (saves: MiB above the state dict; loads: times the data, "
        "after touching every byte; lazy loads also before touching).",
        "",
        "| save | " + " | ".join(c["label"] for c in cases) + " | s/GiB 8 GiB vs 512 MiB |",
        "| --- |" + " ---: |" * (len(cases) + 1),
    ]
    for op in SAVES:
        cells = []
        for c in cases:
            r = c["save"].get(op)
            cells.append("skipped" if r is None else _save_cell(r, c["bytes"]))
        lines.append(f"| {op} | " + " | ".join(cells) + f" | {_linearity(cases, 'save', op, 'seconds')} |")
    lines += [
        "",
        "| load, + touch every byte | "
        + " | ".join(c["label"] for c in cases)
        + " | s/GiB 8 GiB vs 512 MiB |",
        "| --- |" + " ---: |" * (len(cases) + 1),
    ]
    for op in LOADS:
        cells = []
        for c in cases:
            r = c["load"].get(op)
            if r is None:
                cells.append("skipped")
                continue
            cells.append(_load_cell(r, c["bytes"], lazy="lazy" in op))
        lines.append(
            f"| {op} | " + " | ".join(cells) + f" | {_linearity(cases, 'load', op, 'touch_seconds')} |"
        )
    if any(FLOOR in c["load"] for c in cases):  # measured for the many-tensor case only
        cells = [
            _load_cell(c["load"][FLOOR], c["bytes"], lazy=False) if FLOOR in c["load"] else "n/a"
            for c in cases
        ]
        lines.append(f"| {FLOOR} (no file) | " + " | ".join(cells) + " | n/a |")
    return "\n".join(lines) + "\n"


def write_readme_section(text: str) -> None:
    readme = HERE / "README.md"
    start, end = "<!-- scale:start -->", "<!-- scale:end -->"
    body = readme.read_text()
    if start not in body:
        body += f"\n## How it scales\n\n![scale](results/scale.png)\n\n{start}\n{end}\n"
    head, rest = body.split(start, 1)
    tail = rest.split(end, 1)[1]
    readme.write_text(f"{head}{start}\n{text}{end}{tail}")


_STYLE = {
    "raw write + fsync": ("black", "--"),
    "raw readinto": ("black", "--"),
    "torch.save": ("#e07b00", "-"),
    "torch.load weights_only": ("#e07b00", "-"),
    "safetensors save_file": ("#2ca02c", "-"),
    "safetensors load_file": ("#2ca02c", "-"),
    "torchkeep .safetensors (durable)": ("#1f5fbf", "-"),
    "torchkeep .safetensors eager": ("#1f5fbf", "-"),
    "torchkeep .safetensors lazy": ("#1f5fbf", ":"),
    "torchkeep .pt (durable)": ("#7b3fbf", "-"),
    "torchkeep .pt eager": ("#7b3fbf", "-"),
    "torchkeep .pt lazy": ("#7b3fbf", ":"),
}


def _size_axis(ax: Any, cases: list[dict[str, Any]]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks([c["bytes"] / 2**30 for c in cases], [c["label"] for c in cases])
    ax.minorticks_off()
    ax.set_xlabel("state dict size (100 float32 tensors)")


def plot(report: dict[str, Any], target: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install torchkeep[bench]): no picture drawn")
        return False
    cases = [c for c in report["cases"] if c["tensors"] == 100]
    sizes = [c["bytes"] / 2**30 for c in cases]
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.6))
    panels = [
        (
            axes[0],
            "save",
            "seconds",
            "save (durable where marked; torch.save, safetensors do not fsync)\n"
            "above the kernel's dirty-page limit (~4 GiB here) all wait for the disk",
        ),
        (axes[1], "load", "touch_seconds", "load + read every byte (fresh process, page cache warm)"),
    ]
    for ax, kind, key, title in panels:
        ops = SAVES if kind == "save" else LOADS
        for op in ops:
            xs = [s for s, c in zip(sizes, cases, strict=True) if op in c[kind]]
            ys = [c[kind][op][key] for c in cases if op in c[kind]]
            if xs:
                color, style = _STYLE[op]
                ax.plot(xs, ys, style, color=color, marker="o", label=op, linewidth=2)
        _size_axis(ax, cases)
        ax.set_yscale("log")
        ax.set_ylabel("seconds (log; lower is better)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes[2]
    for op in LOADS:
        xs = [s for s, c in zip(sizes, cases, strict=True) if op in c["load"]]
        ys = [c["load"][op]["rss"] / c["bytes"] for c in cases if op in c["load"]]
        if xs and "lazy" not in op:
            color, style = _STYLE[op]
            ax.plot(xs, ys, style, color=color, marker="o", label=f"load: {op}", linewidth=2)
    for op in ("torchkeep .safetensors lazy", "torchkeep .pt lazy"):
        xs = [s for s, c in zip(sizes, cases, strict=True) if op in c["load"]]
        ys = [c["load"][op]["rss_loaded"] / c["bytes"] for c in cases if op in c["load"]]
        if xs:
            color, _ = _STYLE[op]
            ax.plot(xs, ys, ":", color=color, marker="x", label=f"{op}, untouched", linewidth=2)
    for op in ("torchkeep .safetensors (durable)", "torchkeep .pt (durable)", "safetensors save_file"):
        xs = [s for s, c in zip(sizes, cases, strict=True) if op in c["save"]]
        ys = [c["save"][op]["rss"] / c["bytes"] for c in cases if op in c["save"]]
        if xs:
            color, _ = _STYLE[op]
            ax.plot(xs, ys, "-.", color=color, marker="s", label=f"save: {op}", linewidth=1.5)
    _size_axis(ax, cases)
    ax.set_ylabel("peak extra RSS / data size (lower is better)")
    ax.set_title("memory: loads hold the data once (1.0); saves and lazy loads ~0", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(
        f"torchkeep vs torch and safetensors as the state dict grows ({report['machine']})", fontsize=11
    )
    fig.tight_layout()
    fig.savefig(target, dpi=90)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes",
        default="64MiB,512MiB,4GiB,8GiB",
        help="comma-separated sizes, 100 tensors each ('none': only the --many case)",
    )
    parser.add_argument(
        "--many", type=int, default=100_000, help="also a file of this many 1 KiB tensors (0: none)"
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to write the files (default: a temp dir)"
    )
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--no-save", action="store_true", help="print only; write no result files")
    parser.add_argument(
        "--replot",
        action="store_true",
        help="redraw the table and picture from results/scale.json; measure nothing",
    )
    args = parser.parse_args()
    if args.replot:
        report = json.loads((RESULTS / "scale.json").read_text())
        write_readme_section(markdown(report))
        if plot(report, RESULTS / "scale.png"):
            print(f"picture: {RESULTS / 'scale.png'}")
        return
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_implementation()} "
        f"{platform.python_version()}",
        "torch": str(torch.__version__),
        "cases": [],
    }
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for text in [] if args.sizes.strip().lower() in {"", "none"} else args.sizes.split(","):
            total = parse_size(text)
            label = f"{total / 2**30:g} GiB" if total >= 2**30 else f"{total / 2**20:g} MiB"
            report["cases"].append(run_size(label, total, 100, Path(tmp), args.repeat))
        if args.many:
            total = args.many * 1024
            label = f"{args.many // 1000}k tensors ({total / 2**20:.0f} MiB)"
            report["cases"].append(run_size(label, total, args.many, Path(tmp), args.repeat))
    if args.no_save:
        return
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scale.json").write_text(json.dumps(report, indent=1))
    write_readme_section(markdown(report))
    if not args.no_plot and plot(report, RESULTS / "scale.png"):
        print(f"picture: {RESULTS / 'scale.png'}")
    print(f"results: {RESULTS / 'scale.json'}, table: {HERE / 'README.md'}")


if __name__ == "__main__":
    main()
