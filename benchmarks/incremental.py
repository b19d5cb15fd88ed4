"""Incremental checkpoints: bytes and time of each save, side by side with ``incremental=False``.

Run: python -m benchmarks.incremental [--rounds 6] [--threads 1] [--tmp-dir DIR] [--no-save]
     python -m benchmarks.incremental --profile frozen   # where an incremental save's time goes

Four targets, all on the CPU, each configuration saving the *same* state after
the same training step, in turn (the order rotates from save to save, so that
machine load hits every configuration alike); durable saves (fsync), the
defaults otherwise:

1. *frozen backbone*: torchvision resnet50 (10 classes, random weights, batch
   norm weights and statistics made distinct as in a trained network),
   ``freeze(model, bn="eval")`` then ``unfreeze(model, "fc")``, SGD with
   momentum on the head, one training step (batch 2, 64x64) between saves, 10
   checkpoints per round. Target: saves 2-10 each write <= 5% of the bytes of
   a full checkpoint (one save of an ``incremental=False`` run) and take
   <= 10% of the time of a full save (save 1 of the same run, and the
   ``incremental=False`` save of the same state). With and without
   ``trust_version_counters``.
2. *adapters*: eight frozen ``nn.Linear(1024, 1024)`` with a trainable rank-5
   adapter each (about 1% of the parameters), AdamW on the adapters, 50
   checkpoints. Target: the run folder holds <= base + 1.05 x 50 x adapter
   bytes (base: the frozen tensors; adapter: the trainable tensors and their
   optimizer state).
3. *full fine-tuning*: resnet50, every parameter trained (SGD momentum, batch
   norm in train mode), so nothing repeats from save to save. Target: an
   incremental save takes <= 1.05x the time of an ``incremental=False`` save
   and writes the same bytes.
4. *restore* of the last checkpoint of each run above into a fresh model (every
   tensor moved off its initial value first) and optimizer: bitwise equal
   (``torch.equal`` on every state-dict tensor and optimizer state, against the
   live objects and against the ``incremental=False`` restore), and no slower
   than 1.05x the ``incremental=False`` restore (interleaved, medians).

Bytes are the growth of the run folder on disk during a save: "apparent" sums
the files' sizes, "allocated" the blocks the file system gave files and
folders (what ``du`` says). Times are medians, with torch on one thread
(``--threads``: on a machine shared with other jobs a two-thread copy waits for
a descheduled thread, and ``load_state_dict`` went from 20 ms to 450 ms). Each
run writes into a fresh
folder under ``--tmp-dir`` (default: the folder that holds this checkout; not
/tmp, which is often in memory) and deletes it after.

Results: benchmarks/results/incremental.json and the "Incremental checkpoints"
table of benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import torchkeep

HERE = Path(__file__).parent
RESULTS = HERE / "results"
INCR, TRUST, FULL = "incremental", "incremental+trust", "incremental=False"
OPTIONS: dict[str, dict[str, Any]] = {
    INCR: {},
    TRUST: {"trust_version_counters": True},
    FULL: {"incremental": False},
}
Build = Callable[[], tuple[nn.Module, torch.optim.Optimizer]]
Step = Callable[[nn.Module, torch.optim.Optimizer], float]

# -- models -------------------------------------------------------------------------------------------


def pretrained_like(model: nn.Module) -> nn.Module:
    """Give every batch norm layer weights and statistics of its own, as a trained network has.

    A fresh torchvision model has all its norm weights at 1 and biases at 0, so equal tensors
    would be stored once: fewer bytes and fewer tensors to read than any real checkpoint.
    """
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


def build_frozen() -> tuple[nn.Module, torch.optim.Optimizer]:
    """resnet50 with a frozen backbone (batch norm kept in eval) and a trainable 10-class head."""
    import torchvision

    torch.manual_seed(0)
    model = pretrained_like(torchvision.models.resnet50(num_classes=10))
    torchkeep.freeze(model, bn="eval")
    torchkeep.unfreeze(model, "fc")
    model.train()
    return model, torch.optim.SGD(torchkeep.trainable(model), lr=0.01, momentum=0.9)


def build_full() -> tuple[nn.Module, torch.optim.Optimizer]:
    """resnet50, every parameter trainable, batch norm in train mode."""
    import torchvision

    torch.manual_seed(0)
    model = pretrained_like(torchvision.models.resnet50(num_classes=10))
    model.train()
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def image_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> float:
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 10, (2,))
    loss: torch.Tensor = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach().item())


class Adapted(nn.Module):
    """A frozen linear layer plus a trainable low-rank adapter (``up`` starts at zero, as in LoRA)."""

    def __init__(self, width: int, rank: int) -> None:
        super().__init__()
        self.base = nn.Linear(width, width)
        self.down = nn.Linear(width, rank, bias=False)
        self.up = nn.Linear(rank, width, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.base(x) + self.up(self.down(x)))


def build_adapters(
    layers: int = 8, width: int = 1024, rank: int = 5
) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(*(Adapted(width, rank) for _ in range(layers)))
    torchkeep.freeze(model, "*.base.*")
    return model, torch.optim.AdamW(torchkeep.trainable(model), lr=1e-3)


def adapter_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> float:
    x = torch.randn(8, 1024)
    loss: torch.Tensor = model(x).pow(2).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach().item())


def nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [
        v for s in optimizer.state_dict()["state"].values() for v in s.values() if isinstance(v, torch.Tensor)
    ]


# -- measuring ----------------------------------------------------------------------------------------


def disk(root: Path) -> tuple[int, int]:
    """(apparent, allocated) bytes under ``root``: file sizes; blocks of files and folders, as du counts."""
    apparent = allocated = 0
    for folder, dirs, files in os.walk(root):
        allocated += os.lstat(folder).st_blocks * 512
        for name in files:
            st = os.lstat(os.path.join(folder, name))
            apparent += st.st_size
            allocated += st.st_blocks * 512
        del dirs  # walked by os.walk
    return apparent, allocated


def series(
    build: Build, step: Step, configs: list[str], saves: int, root: Path, turn: int
) -> tuple[dict[str, list[dict[str, float]]], dict[str, Path], nn.Module, torch.optim.Optimizer]:
    """Train ``saves`` steps, saving the state after each into one run per configuration, in turn.

    Returns each configuration's saves (seconds, bytes added), its run folder,
    and the live model and optimizer (in the state of the last save).
    """
    model, optimizer = build()
    dirs = {name: Path(tempfile.mkdtemp(prefix=f"{name.replace('=', '-')}-", dir=root)) for name in configs}
    ckpts = {name: torchkeep.Checkpointer(dirs[name], **OPTIONS[name]) for name in configs}
    out: dict[str, list[dict[str, float]]] = {name: [] for name in configs}
    try:
        for k in range(1, saves + 1):
            loss = step(model, optimizer)
            order = configs[(k + turn) % len(configs) :] + configs[: (k + turn) % len(configs)]
            for name in order:
                before = disk(dirs[name])
                start = time.perf_counter()
                ckpts[name].save(k, model=model, optimizer=optimizer, metrics={"loss": loss})
                seconds = time.perf_counter() - start
                after = disk(dirs[name])
                out[name].append(
                    {
                        "seconds": seconds,
                        "apparent": after[0] - before[0],
                        "allocated": after[1] - before[1],
                    }
                )
    finally:
        for c in ckpts.values():
            c.close()
    return out, dirs, model, optimizer


def med(values: list[float]) -> float:
    return float(statistics.median(values))


# -- restore ------------------------------------------------------------------------------------------


def flat_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], Any]:
    """Every tensor of the model's state dict and the optimizer's state, and the rest (param groups)."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    sd = optimizer.state_dict()
    others: dict[str, Any] = {"param_groups": sd["param_groups"]}
    for pid, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{pid}.{key}"] = value
            else:
                others[f"optimizer.{pid}.{key}"] = value
    return tensors, others


def differences(a: tuple[dict[str, torch.Tensor], Any], b: tuple[dict[str, torch.Tensor], Any]) -> list[str]:
    """Names of tensors (or other entries) that differ, bitwise."""
    (ta, oa), (tb, ob) = a, b
    bad = sorted(set(ta) ^ set(tb))
    for key in sorted(set(ta) & set(tb)):
        x, y = ta[key], tb[key]
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
            bad.append(key)
    if oa != ob:
        bad.append("param_groups / non-tensor optimizer state")
    return bad


def bench_restore(
    build: Build, dirs: dict[str, Path], live: tuple[nn.Module, torch.optim.Optimizer], repeat: int
) -> dict[str, Any]:
    """Restore the newest checkpoint of each run into fresh objects, interleaved; check bitwise equality."""
    configs = [INCR, FULL]
    targets = {name: build() for name in configs}
    with torch.no_grad():  # unlike the saved state everywhere, so a tensor left as it was shows
        for model, _ in targets.values():
            for t in model.state_dict().values():
                t.add_(1)
    times: dict[str, list[float]] = {name: [] for name in configs}
    for i in range(repeat + 1):  # the first round warms up
        order = configs if i % 2 == 0 else configs[::-1]
        for name in order:
            model, optimizer = targets[name]
            reader = torchkeep.Checkpointer(dirs[name], read_only=True)
            start = time.perf_counter()
            reader.restore(model=model, optimizer=optimizer)
            seconds = time.perf_counter() - start
            reader.close()
            if i:
                times[name].append(seconds)
    source = flat_state(*live)
    restored = {name: flat_state(*targets[name]) for name in configs}
    diffs = {
        "incremental vs live": differences(restored[INCR], source),
        "incremental=False vs live": differences(restored[FULL], source),
        "incremental vs incremental=False": differences(restored[INCR], restored[FULL]),
    }
    incr, full = med(times[INCR]), med(times[FULL])
    return {
        "tensors_compared": len(source[0]),
        "differences": diffs,
        "bitwise_equal": not any(diffs.values()),
        "seconds": {INCR: incr, FULL: full},
        "samples": times,
        "ratio": incr / full,
        "ratio_of_fastest": min(times[INCR]) / min(times[FULL]),
        "held": not any(diffs.values()) and incr / full <= 1.05,
    }


# -- the targets --------------------------------------------------------------------------------------


def rounds_of(
    build: Build, configs: list[str], rounds: int, saves: int, root: Path
) -> tuple[list[dict[str, list[dict[str, float]]]], dict[str, Any]]:
    """``rounds`` series of image-step saves (the order of configurations rotating), and the restore
    benchmark on the last round's runs; every run folder is deleted after its round."""
    runs: list[dict[str, list[dict[str, float]]]] = []
    restore: dict[str, Any] = {}
    for r in range(rounds):
        out, dirs, model, optimizer = series(build, image_step, configs, saves, root, turn=r)
        runs.append(out)
        if r == rounds - 1:
            restore = bench_restore(build, dirs, (model, optimizer), repeat=15)
        for d in dirs.values():
            shutil.rmtree(d)
    return runs, restore


def bench_frozen(root: Path, rounds: int, saves: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Target 1 (and the frozen case of target 4, on the last round's runs)."""
    runs, restore = rounds_of(build_frozen, [INCR, TRUST, FULL], rounds, saves, root)
    full_bytes = med([s["apparent"] for run in runs for s in run[FULL]])
    full_alloc = med([s["allocated"] for run in runs for s in run[FULL]])
    full_save = med([s["seconds"] for run in runs for s in run[FULL]])
    result: dict[str, Any] = {
        "model": "resnet50(num_classes=10), backbone frozen (bn eval), fc trained; SGD momentum; "
        "batch 2 64x64",
        "saves": saves,
        "rounds": rounds,
        "full_checkpoint_bytes": full_bytes,
        "full_checkpoint_allocated": full_alloc,
        "full_save_seconds": full_save,
        "samples": runs,
        "configs": {},
    }
    held = True
    for name in (INCR, TRUST):
        later = [s for run in runs for s in run[name][1:]]
        first = med([run[name][0]["seconds"] for run in runs])
        bytes_max = max(s["apparent"] for s in later)
        alloc_max = max(s["allocated"] for s in later)
        t_later = med([s["seconds"] for s in later])
        paired = med(
            [run[name][i]["seconds"] / run[FULL][i]["seconds"] for run in runs for i in range(1, saves)]
        )
        entry: dict[str, Any] = {
            "save1_seconds": first,
            "save1_bytes": med([run[name][0]["apparent"] for run in runs]),
            "later_seconds_median": t_later,
            "later_seconds_max": max(s["seconds"] for s in later),
            "later_bytes_median": med([s["apparent"] for s in later]),
            "later_bytes_max": bytes_max,
            "later_allocated_max": alloc_max,
            "bytes_ratio_max": bytes_max / full_bytes,
            "allocated_ratio_max": alloc_max / full_alloc,
            "time_vs_save1": t_later / first,
            "time_vs_full_save": t_later / full_save,
            "time_vs_full_save_paired": paired,
            "time_vs_full_save_fastest": min(s["seconds"] for s in later)
            / min(s["seconds"] for run in runs for s in run[FULL]),
        }
        entry["bytes_held"] = entry["bytes_ratio_max"] <= 0.05
        entry["time_held"] = entry["time_vs_save1"] <= 0.10 and entry["time_vs_full_save"] <= 0.10
        held = held and entry["bytes_held"] and entry["time_held"]
        result["configs"][name] = entry
    result["held"] = held
    return result, restore


def bench_adapters(root: Path, saves: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Target 2 (and the adapter case of target 4)."""
    configs = [INCR, FULL]
    out, dirs, model, optimizer = series(build_adapters, adapter_step, configs, saves, root, turn=0)
    restore = bench_restore(build_adapters, dirs, (model, optimizer), repeat=15)
    totals = {name: disk(dirs[name]) for name in configs}
    for d in dirs.values():
        shutil.rmtree(d)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    trained = [p for p in model.parameters() if p.requires_grad]
    base = nbytes(frozen) + nbytes(list(model.buffers()))
    adapter = nbytes(trained) + nbytes(optimizer_tensors(optimizer))
    budget = base + 1.05 * saves * adapter
    total = totals[INCR][0]
    share = nbytes(trained) / (nbytes(trained) + nbytes(frozen))
    return {
        "model": f"8 x frozen Linear(1024, 1024) + rank-5 adapters ({share:.2%} of the parameters); AdamW",
        "saves": saves,
        "base_bytes": base,
        "adapter_bytes": adapter,
        "budget_bytes": budget,
        "total_bytes": total,
        "total_allocated": totals[INCR][1],
        "full_total_bytes": totals[FULL][0],
        "full_total_allocated": totals[FULL][1],
        "per_save_over_adapter": (total - base) / (saves * adapter),
        "allocated_per_save_over_adapter": (totals[INCR][1] - base) / (saves * adapter),
        "later_bytes_median": med([s["apparent"] for s in out[INCR][1:]]),
        "seconds": {name: med([s["seconds"] for s in out[name][1:]]) for name in configs},
        "samples": out,
        "held": total <= budget,
    }, restore


def bench_full(root: Path, rounds: int, saves: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Target 3 (and the full fine-tuning case of target 4)."""
    configs = [INCR, FULL]
    runs, restore = rounds_of(build_full, configs, rounds, saves, root)

    def later(name: str, key: str) -> list[float]:
        return [s[key] for run in runs for s in run[name][1:]]

    t = {name: med(later(name, "seconds")) for name in configs}
    b = {name: med(later(name, "apparent")) for name in configs}
    paired = med([run[INCR][i]["seconds"] / run[FULL][i]["seconds"] for run in runs for i in range(1, saves)])
    return {
        "model": "resnet50(num_classes=10), every parameter trained; SGD momentum; batch 2 64x64",
        "saves": saves,
        "rounds": rounds,
        "seconds": t,
        "bytes": b,
        "save1_seconds": {name: med([run[name][0]["seconds"] for run in runs]) for name in configs},
        "time_ratio": t[INCR] / t[FULL],
        "time_ratio_paired": paired,
        "time_ratio_fastest": min(later(INCR, "seconds")) / min(later(FULL, "seconds")),
        "bytes_ratio": b[INCR] / b[FULL],
        "samples": runs,
        "held": t[INCR] / t[FULL] <= 1.05 and b[INCR] / b[FULL] <= 1.01,
    }, restore


# -- output -------------------------------------------------------------------------------------------


def mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def yes(ok: bool) -> str:
    return "held" if ok else "**missed**"


def markdown(report: dict[str, Any]) -> str:
    f, a, u, rs = report["frozen"], report["adapters"], report["full"], report["restore"]
    lines = [
        f"Measured {report['date']} on {report['machine']} (torch {report['torch']}), "
        f"`python -m benchmarks.incremental`, {report['torch_threads']} torch thread(s); durable saves, "
        "page cache warm; medians "
        f"({f['rounds']} rounds of {f['saves']} saves for 1, {u['rounds']} of {u['saves']} for 3; "
        'configurations interleaved; "fastest": the fastest of each, divided). Bytes: growth of the run '
        "folder per save (file sizes). Time ratios of 1: the median of saves 2-10 over save 1 of the same "
        "run / over the incremental=False saves.",
        "",
        "| target | measured | ratio | goal | |",
        "| --- | --- | ---: | --- | --- |",
    ]
    full = (
        f"full checkpoint {mib(f['full_checkpoint_bytes'])}, full save {f['full_save_seconds'] * 1e3:.0f} ms"
    )
    for name in (INCR, TRUST):
        c = f["configs"][name]
        lines.append(
            f"| 1. frozen resnet50, {name}: bytes of saves 2-{f['saves']} (max) | "
            f"{mib(c['later_bytes_max'])} ({full}) | {c['bytes_ratio_max']:.4f} | <= 0.05 | "
            f"{yes(c['bytes_held'])} |"
        )
        lines.append(
            f"| 1. frozen resnet50, {name}: time of saves 2-{f['saves']} | "
            f"{c['later_seconds_median'] * 1e3:.1f} ms (save 1 {c['save1_seconds'] * 1e3:.0f} ms, "
            f"incremental=False {f['full_save_seconds'] * 1e3:.0f} ms) | "
            f"{c['time_vs_save1']:.3f} / {c['time_vs_full_save']:.3f} (fastest "
            f"{c['time_vs_full_save_fastest']:.3f}) | <= 0.10 of each | "
            f"{yes(c['time_held'])} |"
        )
    lines.append(
        f"| 2. adapters, {a['saves']} saves: run folder | {mib(a['total_bytes'])} "
        f"(base {mib(a['base_bytes'])}, "
        f"adapter {mib(a['adapter_bytes'])}, budget {mib(a['budget_bytes'])}; incremental=False "
        f"{mib(a['full_total_bytes'])}) | {a['per_save_over_adapter']:.3f} x adapter per save "
        f"(allocated {a['allocated_per_save_over_adapter']:.3f}) | "
        f"<= 1.05 | {yes(a['held'])} |"
    )
    lines.append(
        f"| 3. full fine-tuning resnet50: save time | {u['seconds'][INCR] * 1e3:.0f} ms vs "
        f"{u['seconds'][FULL] * 1e3:.0f} ms | {u['time_ratio']:.3f} (paired {u['time_ratio_paired']:.3f}, "
        f"fastest {u['time_ratio_fastest']:.3f}) | "
        f"<= 1.05 | {yes(u['time_ratio'] <= 1.05)} |"
    )
    lines.append(
        f"| 3. full fine-tuning resnet50: bytes per save | {mib(u['bytes'][INCR])} vs "
        f"{mib(u['bytes'][FULL])} | "
        f"{u['bytes_ratio']:.4f} | same (<= 1.01) | {yes(u['bytes_ratio'] <= 1.01)} |"
    )
    for case, r in rs.items():
        equal = "bitwise equal" if r["bitwise_equal"] else f"**differs**: {r['differences']}"
        lines.append(
            f"| 4. restore, {case} | {r['seconds'][INCR] * 1e3:.0f} ms vs {r['seconds'][FULL] * 1e3:.0f} ms; "
            f"{equal} ({r['tensors_compared']} tensors) | {r['ratio']:.3f} (fastest "
            f"{r['ratio_of_fastest']:.3f}) | <= 1.05, equal | "
            f"{yes(r['held'])} |"
        )
    return "\n".join(lines)


def write_readme_section(text: str) -> None:
    readme = HERE / "README.md"
    start, end = "<!-- incremental:start -->", "<!-- incremental:end -->"
    body = readme.read_text()
    if start not in body:
        body += f"\n{start}\n{end}\n"
    head, rest = body.split(start, 1)
    tail = rest.split(end, 1)[1]
    readme.write_text(f"{head}{start}\n{text}\n{end}{tail}")


# -- profiling ----------------------------------------------------------------------------------------

# (label, module, attribute): each is wrapped with a timer; times are inclusive (nested labels are parts)
_SAVE_PHASES = [
    ("capture (the snapshot)", "torchkeep.run.checkpointer", "capture"),
    ("  model state_dict", "torchkeep.run.snapshot", "to_state_dict"),
    ("  compact_tensors (ties)", "torchkeep.run.snapshot", "compact_tensors"),
    ("  RNG state", "torchkeep.run.snapshot", "capture_rng_state"),
    ("lock (+ load the pack index, save 1)", "torchkeep.run.checkpointer.Checkpointer", "_take_lock"),
    ("commit", "torchkeep.run.checkpointer", "commit"),
    ("  write_indexed (incremental)", "torchkeep.run.commit", "write_indexed"),
    ("    pack (write_chosen: hashing beside the writes)", "torchkeep.run.blobs", "write_chosen"),
    ("      tensor digests (saving thread + helper, summed)", "torchkeep.run.blobs", "tensor_digest"),
    ("    pack fsync (atomic_target's fsync_file)", "torchkeep.storage.atomic", "fsync_file"),
    ("    tensors.json (write_json)", "torchkeep.run.blobs", "write_json"),
    ("  write_safetensors (incremental=False files)", "torchkeep.run.commit", "write_safetensors"),
    ("  state.json + manifest.json (write_json)", "torchkeep.run.commit", "write_json"),
    ("  file_record (reads back + hashes JSON)", "torchkeep.run.commit", "file_record"),
    ("  publish (folder fsyncs, rename)", "torchkeep.storage.local.LocalStore", "publish"),
    ("prune", "torchkeep.run.checkpointer.Checkpointer", "_prune"),
    ("collect (unused packs)", "torchkeep.run.checkpointer", "collect"),
    (
        "NaN/Inf check (_nonfinite, in the rows above: after the writes)",
        "torchkeep.storage.tensorfile",
        "_nonfinite",
    ),
    ("all os.fsync (in the rows above)", "os", "fsync"),
    ("all json.dump (in the rows above)", "json", "dump"),
]
_RESTORE_PHASES = [
    ("list steps", "torchkeep.run.reader.RunReader", "steps"),
    ("verify_step (checksums)", "torchkeep.run.restore", "verify_step"),
    ("  verify_folder (file digests)", "torchkeep.run.reader", "verify_folder"),
    ("  verify_packs", "torchkeep.run.reader", "verify_packs"),
    ("    file_record (pack digests)", "torchkeep.run.blobs", "file_record"),
    ("apply_checkpoint", "torchkeep.run.restore", "apply_checkpoint"),
    ("  _read_tensors", "torchkeep.run.snapshot", "_read_tensors"),
    ("    read_indexed_files (packs)", "torchkeep.run.snapshot", "read_indexed_files"),
    ("      read_safetensors", "torchkeep.run.blobs", "read_safetensors"),
    ("    safetensors load_file (state, incremental=False)", "safetensors.torch", "load_file"),
    ("    load_weights (model, incremental=False)", "torchkeep.run.snapshot", "load_weights"),
    ("  apply_states (load_state_dict)", "torchkeep.run.snapshot", "apply_states"),
    ("    model (load_into)", "torchkeep.restoring", "load_into"),
    ("    optimizer load_state_dict", "torch.optim.Optimizer", "load_state_dict"),
    ("  RNG restore", "torchkeep.run.snapshot", "_restore_rngs"),
]


class Phases:
    """Timers around library functions, set as module (or class) attributes so the package calls them.

    ``sample(key)`` opens one sample (a save or a restore) of configuration ``key``; every timed call
    until the next ``sample`` adds to it. ``stop()`` ends timing.
    """

    def __init__(self, phases: list[tuple[str, str, str]]) -> None:
        import importlib

        self.phases = phases
        self.samples: dict[str, list[dict[str, list[float]]]] = {}
        self._current: dict[str, list[float]] | None = None
        self._undo: list[tuple[Any, str, Any]] = []
        for label, module, attr in phases:
            try:
                owner: Any = importlib.import_module(module)
            except ImportError:  # a class: module.Class
                head, _, cls = module.rpartition(".")
                owner = getattr(importlib.import_module(head), cls)
            original = getattr(owner, attr)
            self._undo.append((owner, attr, original))
            setattr(owner, attr, self._wrap(label, original))

    def sample(self, key: str) -> None:
        """Start a sample of ``key``."""
        self._current = {}
        self.samples.setdefault(key, []).append(self._current)

    def stop(self, total: float) -> None:
        """End the sample; ``total`` is its wall time."""
        if self._current is not None:
            self._current["total"] = [total]
        self._current = None

    def _wrap(self, label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            current = self._current
            if current is None:
                return fn(*args, **kwargs)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                current.setdefault(label, []).append(time.perf_counter() - start)

        return timed

    def close(self) -> None:
        for owner, attr, original in reversed(self._undo):
            setattr(owner, attr, original)

    def table(self, title: str, keys: list[str]) -> str:
        """Medians over the samples of each key: ms a sample, and calls a sample in brackets."""
        count = min(len(self.samples.get(k, [])) for k in keys)
        lines = [
            f"\n## {title}: ms each, medians of {count}, configurations interleaved; times are inclusive "
            "(nested rows are parts of the row above), calls each in brackets\n",
            "| phase | " + " | ".join(keys) + " |",
            "| --- |" + " ---: |" * len(keys),
        ]
        for label in ["total", *(p[0] for p in self.phases)]:
            cells = []
            for k in keys:
                runs = [s.get(label, []) for s in self.samples.get(k, [])]
                if not any(runs):
                    cells.append("")
                    continue
                ms = statistics.median(sum(r) for r in runs) * 1e3
                calls = statistics.median(len(r) for r in runs)
                cells.append(f"**{ms:.1f}**" if label == "total" else f"{ms:.2f} ({calls:g})")
            if any(cells):
                name = "**total (wall)**" if label == "total" else label
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


def profile(kind: str, root: Path, saves: int) -> None:
    """Time the phases of saves 2..N (and of restoring the last) of each configuration of ``kind``."""
    build, step = {
        "frozen": (build_frozen, image_step),
        "full": (build_full, image_step),
        "adapters": (build_adapters, adapter_step),
    }[kind]
    configs = [INCR, TRUST, FULL] if kind == "frozen" else [INCR, FULL]
    phases = Phases(_SAVE_PHASES)
    model, optimizer = build()
    dirs = {name: Path(tempfile.mkdtemp(prefix="profile-", dir=root)) for name in configs}
    ckpts = {name: torchkeep.Checkpointer(dirs[name], **OPTIONS[name]) for name in configs}
    try:
        for k in range(1, saves + 1):
            loss = step(model, optimizer)
            order = configs[k % len(configs) :] + configs[: k % len(configs)]
            for name in order:
                if k > 1:
                    phases.sample(name)
                start = time.perf_counter()
                ckpts[name].save(k, model=model, optimizer=optimizer, metrics={"loss": loss})
                phases.stop(time.perf_counter() - start)
    finally:
        for c in ckpts.values():
            c.close()
        phases.close()
    print(phases.table(f"{kind}: saves 2-{saves}", configs))
    phases = Phases(_RESTORE_PHASES)
    restored = [INCR, FULL]
    targets = {name: build() for name in restored}
    try:
        for i in range(12):  # the first round warms up
            for name in restored if i % 2 == 0 else restored[::-1]:
                reader = torchkeep.Checkpointer(dirs[name], read_only=True)
                if i:
                    phases.sample(name)
                start = time.perf_counter()
                reader.restore(model=targets[name][0], optimizer=targets[name][1])
                phases.stop(time.perf_counter() - start)
                reader.close()
    finally:
        phases.close()
        for d in dirs.values():
            shutil.rmtree(d)
    print(phases.table(f"{kind}: restore of the last checkpoint", restored))


# -- main ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=6, help="rounds of targets 1 and 3 (default 6)")
    parser.add_argument("--saves", type=int, default=10, help="checkpoints per round of target 1")
    parser.add_argument("--full-saves", type=int, default=5, help="checkpoints per round of target 3")
    parser.add_argument("--adapter-saves", type=int, default=50, help="checkpoints of target 2")
    parser.add_argument(
        "--tmp-dir",
        type=Path,
        default=HERE.resolve().parent.parent,
        help="where the run folders go (default: the folder holding this checkout)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared machine a parallel copy waits for a descheduled "
        "thread, which made a 20 ms load_state_dict take 450 ms here)",
    )
    parser.add_argument("--profile", choices=["frozen", "full", "adapters"], help="profile saves instead")
    parser.add_argument("--no-save", action="store_true", help="print only; write no result files")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="torchkeep-bench-incremental-", dir=args.tmp_dir))
    started = time.perf_counter()
    try:
        if args.profile:
            profile(args.profile, root, args.saves)
            return
        frozen, restore_frozen = bench_frozen(root, args.rounds, args.saves)
        adapters, restore_adapters = bench_adapters(root, args.adapter_saves)
        full, restore_full = bench_full(root, args.rounds, args.full_saves)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_implementation()} "
        f"{platform.python_version()}",
        "torch": str(torch.__version__),
        "torch_threads": torch.get_num_threads(),
        "seconds_total": time.perf_counter() - started,
        "frozen": frozen,
        "adapters": adapters,
        "full": full,
        "restore": {
            "frozen resnet50": restore_frozen,
            "adapters": restore_adapters,
            "full fine-tuning resnet50": restore_full,
        },
    }
    report["held"] = {
        "1. frozen backbone": frozen["held"],
        "2. adapters": adapters["held"],
        "3. full fine-tuning": full["held"],
        "4. restore": all(r["held"] for r in report["restore"].values()),
    }
    text = markdown(report)
    print(text)
    print(f"\n{report['held']}; {report['seconds_total']:.0f} s")
    if args.no_save:
        return
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "incremental.json").write_text(json.dumps(report, indent=1))
    write_readme_section(text)
    print(f"results: {RESULTS / 'incremental.json'}, table: {HERE / 'README.md'}")


if __name__ == "__main__":
    main()
