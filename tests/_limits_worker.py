"""Run every loader on one hostile file under memory and CPU limits; print what each did as JSON.

``python tests/_limits_worker.py FILE EXTRA_AS_BYTES CPU_SECONDS``: after the
imports, the address space is capped at the current size plus
``EXTRA_AS_BYTES`` and CPU time at ``CPU_SECONDS``, so a file that makes a
loader allocate or compute without bound ends in MemoryError or SIGXCPU
instead of a typed refusal, and the test sees it.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any


def _vm_size() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def _outcome(call: Any) -> str:
    import torchkeep

    try:
        result = call()
    except torchkeep.TorchkeepError as err:
        return type(err).__name__
    except BaseException as err:  # an untyped error is a failure the test reports
        return f"UNTYPED {type(err).__name__}: {str(err)[:200]}"
    return result if isinstance(result, str) else "LOADED"


def main() -> None:
    path, extra, cpu = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    import torch  # noqa: F401

    import torchkeep
    from torchkeep.tutorial import TheModelClass

    model = TheModelClass()
    torchkeep.scan(Path(__file__))  # warm the lazy imports before the caps
    baseline = _vm_size()
    resource.setrlimit(resource.RLIMIT_AS, (baseline + extra, baseline + extra))
    used = resource.getrusage(resource.RUSAGE_SELF).ru_utime
    resource.setrlimit(resource.RLIMIT_CPU, (int(used) + cpu, int(used) + cpu + 5))
    results: dict[str, Any] = {}
    for name, call in (
        ("load_weights", lambda: torchkeep.load_weights(path)),
        ("load_checkpoint", lambda: torchkeep.load_checkpoint(path)),
        ("load_into", lambda: torchkeep.load_into(model, path)),
        ("scan", lambda: torchkeep.scan(path).verdict),
    ):
        start = time.process_time()
        results[name] = _outcome(call)
        results[f"{name}_cpu_s"] = round(time.process_time() - start, 3)
    results["maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10
    print(json.dumps(results))


if __name__ == "__main__":
    main()
