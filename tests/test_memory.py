"""Memory bounds of saves and loads, measured in a fresh process with the kernel's peak-RSS counter.

Bounds from the speed issue: an eager load holds at most 1.05x the tensor
bytes beyond what the process had; a save at most 64 MiB plus the largest
tensor (asynchronous: one staging copy of the state). A few MiB of slack
cover the allocator and the interpreter. Linux only (``/proc/self/clear_refs``
resets the peak).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

MIB = 2**20
SIZE = 128 * MIB
COUNT = 16
LARGEST = SIZE // COUNT
SLACK = 12 * MIB

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs"
)

_CHILD = r"""
import gc, json, sys, time
import torch, torchkeep
folder, group = sys.argv[1], sys.argv[2]

def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

def measure(action, key):
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    base, base_anon = status("VmRSS"), status("RssAnon")
    kept = action()
    time.sleep(0.2)
    results[key] = max(status("VmHWM"), status("VmRSS")) - base
    results[key + " (private)"] = status("RssAnon") - base_anon  # without mapped file pages
    del kept

results = {}
if group == "save":
    g = torch.Generator().manual_seed(0)
    state = {f"t{i}": torch.randn(SIZE // 4 // COUNT, generator=g) for i in range(COUNT)}
    module = torch.nn.Module()
    for key, t in state.items():
        module.register_buffer(key, t)
    ckpts = torchkeep.Checkpointer(f"{folder}/run")
    background = torchkeep.Checkpointer(f"{folder}/arun", async_save=True)
    measure(lambda: torchkeep.save_weights(state, f"{folder}/w.safetensors"), "save .safetensors")
    measure(lambda: torchkeep.save_weights(state, f"{folder}/w.pt"), "save .pt")
    measure(lambda: ckpts.save(1, model=module), "Checkpointer.save")
    measure(lambda: (background.save(1, model=module), background.wait()), "Checkpointer.save async")
else:
    path = f"{folder}/w.safetensors"
    measure(lambda: torchkeep.load_weights(path, mmap=False), "load .safetensors eager")
    measure(lambda: torchkeep.load_weights(f"{folder}/w.pt"), "load .pt eager")
    measure(lambda: torchkeep.load_weights(path, dtype=torch.bfloat16), "load .safetensors as bfloat16")
    measure(lambda: torchkeep.load_weights(path), "load .safetensors lazy")
print(json.dumps(results))
""".replace("SIZE", str(SIZE)).replace("COUNT", str(COUNT))


def _run(folder: Path, group: str) -> dict[str, int]:
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(folder), group], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results: dict[str, int] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    folder = tmp_path_factory.mktemp("memory")
    results = _run(folder, "save")
    results.update(_run(folder, "load"))
    return results


@pytest.mark.parametrize("kind", ["save .safetensors", "save .pt", "Checkpointer.save"])
def test_a_save_holds_at_most_64_mib_plus_the_largest_tensor(measured: dict[str, int], kind: str) -> None:
    assert measured[kind] <= 64 * MIB + LARGEST, f"{kind}: {measured[kind] / MIB:.1f} MiB extra"


def test_an_async_save_holds_one_staging_copy(measured: dict[str, int]) -> None:
    extra = measured["Checkpointer.save async"]
    assert 0.9 * SIZE <= extra <= SIZE + SLACK, f"{extra / MIB:.1f} MiB extra"  # the snapshot is real


@pytest.mark.parametrize("kind", ["load .safetensors eager", "load .pt eager"])
def test_an_eager_load_holds_the_tensors_once(measured: dict[str, int], kind: str) -> None:
    extra = measured[kind]
    assert extra + SLACK >= SIZE, "the tensors were not read into private memory"
    assert extra <= 1.05 * SIZE + SLACK, f"{kind}: {extra / MIB:.1f} MiB extra for {SIZE / MIB:.0f} MiB"


def test_a_cast_on_load_makes_no_second_full_copy(measured: dict[str, int]) -> None:
    # the file is mapped (its pages are page cache, counted in RSS while mapped); private memory
    # holds only the bfloat16 result, never a float32 copy of the whole state
    private = measured["load .safetensors as bfloat16 (private)"]
    assert 0.5 * SIZE - SLACK <= private <= 0.5 * SIZE * 1.05 + SLACK, f"{private / MIB:.1f} MiB"
    assert measured["load .safetensors as bfloat16"] <= 1.5 * SIZE * 1.05 + SLACK


def test_a_lazy_load_reads_nothing_up_front(measured: dict[str, int]) -> None:
    assert measured["load .safetensors lazy"] <= SLACK
    assert measured["load .safetensors lazy (private)"] <= SLACK
