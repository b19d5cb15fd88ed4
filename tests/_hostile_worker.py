"""Load every hostile file with every loader, under an audit hook that records anything dangerous.

Run as ``python tests/_hostile_worker.py CORPUS_DIR INDEX_JSON``; prints one JSON
object: what each loader raised per case, and the audit events seen while
the loaders ran (process spawns, exec/compile, imports of modules not loaded
before, files opened for writing). The test asserts on both.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import tempfile
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


def main() -> None:
    global ARMED
    corpus, index_file = Path(sys.argv[1]), Path(sys.argv[2])
    cases = json.loads(index_file.read_text())
    import numpy  # noqa: F401  (the scan of .npy files must not be the first to import it)
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
        for path in files:
            _outcome(lambda path=path: torchkeep.load_weights(path))
            _outcome(lambda path=path: torchkeep.load_checkpoint(path))
            _outcome(lambda path=path: torchkeep.load_into(model, path))
            _outcome(lambda path=path: torchkeep.scan(path).verdict)
    _known_modules.update(sys.modules)
    sys.addaudithook(_hook)
    ARMED = True
    results = {}
    for case in cases:
        path = corpus / case["file"]
        results[case["name"]] = {
            "load_weights": _outcome(lambda path=path: torchkeep.load_weights(path)),
            "load_checkpoint": _outcome(lambda path=path: torchkeep.load_checkpoint(path)),
            "load_into": _outcome(lambda path=path: torchkeep.load_into(model, path)),
            "scan": _outcome(lambda path=path: torchkeep.scan(path).verdict),
        }
    ARMED = False
    print(json.dumps({"results": results, "violations": VIOLATIONS}))


if __name__ == "__main__":
    main()
