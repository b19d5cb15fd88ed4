"""Load every hostile file with every entry point, under an audit hook and a memory limit.

Run as ``python tests/_hostile_worker.py CORPUS_DIR INDEX_JSON``; prints one JSON
object: what each entry point (load_weights, load_checkpoint, load_into,
load_model, summarize, scan, and the CLI's inspect and convert) did per case,
the CPU seconds each case took, and the audit events seen while they ran
(process spawns, exec/compile, imports of modules not loaded before, files
opened for writing). The address space is limited to what the warmed-up
process uses plus ``MEMORY_BUDGET``: a file that makes a reader allocate more
shows up as an untyped MemoryError. The test asserts on all of it.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import resource
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

ARMED = False
VIOLATIONS: list[str] = []
_SPAWN_EVENTS = {
    "os.system",
    "os.exec",
    "os.posix_spawn",
    "os.spawn",
    "os.fork",
    "os.forkpty",
    "subprocess.Popen",
    "exec",
    "compile",
    "ctypes.dlopen",
    "pty.spawn",
}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_known_modules: set[str] = set()
MEMORY_BUDGET = 3 << 30  # bytes of address space a refusal may take on top of the warmed-up process
CPU_CAP = 1200  # CPU seconds for the whole corpus, a guard against a hang (not a measure)


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if not ARMED:
        return
    if event in _SPAWN_EVENTS:
        VIOLATIONS.append(f"{event}: {str(args)[:120]}")
    elif event == "import" and args and args[0] not in _known_modules:
        VIOLATIONS.append(f"import of {args[0]}")
    elif event == "open" and len(args) >= 3:
        path, mode, flags = args[0], args[1], args[2]
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & _WRITE_FLAGS
        )
        if writing:
            VIOLATIONS.append(f"open for writing: {path}")


def _outcome(call: Any) -> str:
    import torchkeep

    try:
        result = call()
    except torchkeep.TorchkeepError as err:
        return type(err).__name__
    except Exception as err:  # an untyped error is a failure the test reports
        return f"UNTYPED {type(err).__name__}: {str(err)[:200]}"
    return result if isinstance(result, str) else "LOADED"


def _cli(argv: list[str]) -> str:
    """The CLI in this process (so the hook sees it): its exit code, or the untyped error it let out."""
    from torchkeep.cli import main

    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            main(argv)
    except SystemExit as done:
        return f"exit {done.code}"
    except Exception as err:
        return f"UNTYPED {type(err).__name__}: {str(err)[:200]}"
    return "exit 0"


def _entry_points(path: Path, model: Any, out_dir: Path) -> dict[str, Any]:
    import torchkeep

    return {
        "load_weights": lambda: torchkeep.load_weights(path),
        "load_checkpoint": lambda: torchkeep.load_checkpoint(path),
        "load_into": lambda: torchkeep.load_into(model, path),
        "load_model": lambda: torchkeep.load_model(path),
        "summarize": lambda: torchkeep.summarize(path),
        "scan": lambda: torchkeep.scan(path).verdict,
        "cli_inspect": lambda: _cli(["inspect", str(path)]),
        "cli_convert": lambda: _cli(["convert", str(path), str(out_dir / "converted.safetensors")]),
    }


def _address_space() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def main() -> None:
    global ARMED
    corpus, index_file = Path(sys.argv[1]), Path(sys.argv[2])
    cases = json.loads(index_file.read_text())
    import numpy  # (the scan of .npy files must not be the first to import it)
    import torch

    import torchkeep
    from torchkeep.tutorial import TheModelClass

    model = TheModelClass()
    # Warm up every code path once with files of our own (good ones, a refused one, damaged
    # ones), so the lazy imports of normal operation happen before the hook is armed.
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for suffix in (".pt", ".safetensors"):
            benign = Path(tmp) / f"w{suffix}"
            torchkeep.save_weights(model, benign)
            files.append(benign)
            truncated = Path(tmp) / f"cut{suffix}"
            truncated.write_bytes(benign.read_bytes()[:-40])
            files.append(truncated)
        torch.save({"weight": torch.ones(1)}, Path(tmp) / "legacy.pt", _use_new_zipfile_serialization=False)
        torch.save({"counts": collections.Counter("ab")}, Path(tmp) / "refused.pt")
        files += [Path(tmp) / "legacy.pt", Path(tmp) / "refused.pt"]
        program = Path(tmp) / "m.pt2"
        torchkeep.save_model(model, program, example_inputs=(torch.randn(1, 3, 26, 26),))
        numpy.save(Path(tmp) / "a.npy", numpy.ones(3))
        cut_program = Path(tmp) / "cut.pt2"
        cut_program.write_bytes(program.read_bytes()[:-40])
        refused_program = Path(tmp) / "refused.pt2"
        with zipfile.ZipFile(program) as src, zipfile.ZipFile(refused_program, "w") as dst:
            for name in src.namelist():
                dst.writestr(name, src.read(name))
            dst.writestr(f"{src.namelist()[0].split('/')[0]}/extra.bin", b"x")
        files += [program, cut_program, refused_program, Path(tmp) / "a.npy"]
        for path in files:
            for call in _entry_points(path, model, Path(tmp)).values():
                _outcome(call)
        out_dir = Path(tmp) / "out"
        out_dir.mkdir()
        _known_modules.update(sys.modules)
        limit = _address_space() + MEMORY_BUDGET
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
        # a hard stop for a file that would compute for ever (the test checks each file's share)
        cpu_cap = int(resource.getrusage(resource.RUSAGE_SELF).ru_utime) + CPU_CAP
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_cap, resource.getrlimit(resource.RLIMIT_CPU)[1]))
        sys.addaudithook(_hook)
        ARMED = True
        results: dict[str, dict[str, str]] = {}
        cpu: dict[str, float] = {}
        for case in cases:
            path = corpus / case["file"]
            started = time.process_time()
            results[case["name"]] = {
                name: _outcome(call) for name, call in _entry_points(path, model, out_dir).items()
            }
            cpu[case["name"]] = time.process_time() - started
        ARMED = False
        written = sorted(p.name for p in out_dir.iterdir())
    print(json.dumps({"results": results, "cpu_seconds": cpu, "violations": VIOLATIONS, "written": written}))


if __name__ == "__main__":
    main()
