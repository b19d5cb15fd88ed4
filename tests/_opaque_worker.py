"""Load checkpoints whose hyper-parameters need code, under an audit hook: nothing may run.

Run as ``python tests/_opaque_worker.py CASES_JSON``; CASES_JSON lists
``{"path": ..., "model": "tiny" | "none"}``. Prints one JSON object: per case
what ``load_checkpoint`` returned (layout, restored parts, placeholders, the
repr of the hyper-parameters, a weight checksum) or the error type, and the
audit events seen while armed (process spawns, exec/compile, imports of
modules not loaded before, files opened for writing). The hook is the one of
tests/_hostile_worker.py.
"""

from __future__ import annotations

import argparse
import copy
import json
import pathlib
import sys
import tempfile
from pathlib import Path
from typing import Any

import _hostile_worker as audit  # the one audit hook of the hostile tests


def main() -> None:
    import torch
    from torch import nn

    import torchkeep
    from torchkeep.safety.opaque import VALUE_TYPES

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(4, 1)

    def load(path: Path, with_model: bool) -> dict[str, Any]:
        model = Tiny() if with_model else None
        try:
            info = torchkeep.load_checkpoint(path, model=model, rebuild=VALUE_TYPES)
        except torchkeep.TorchkeepError as err:
            return {"error": type(err).__name__, "message": str(err)[:400]}
        hparams = copy.deepcopy(info.hyper_parameters)  # what a user would do with them: nothing runs
        return {
            "layout": info.layout,
            "restored": list(info.restored),
            "placeholders": list(info.placeholders),
            "hparams": repr(hparams),
            "checksum": float(sum(p.sum() for p in model.parameters())) if model is not None else None,
        }

    cases = json.loads(Path(sys.argv[1]).read_text())
    with tempfile.TemporaryDirectory() as tmp:
        # warm up the code paths (and their lazy imports) with files of our own
        warm = Path(tmp) / "warm.ckpt"
        torch.save(
            {
                "state_dict": Tiny().state_dict(),
                "pytorch-lightning_version": "2.6.6",
                "hyper_parameters": {"args": argparse.Namespace(p=pathlib.PurePosixPath("/x"))},
            },
            warm,
        )
        load(warm, True)
        audit._known_modules.update(sys.modules)
        sys.addaudithook(audit._hook)
        audit.ARMED = True
        results = [load(Path(case["path"]), case["model"] == "tiny") for case in cases]
        audit.ARMED = False
    print(json.dumps({"results": results, "violations": audit.VIOLATIONS}))


if __name__ == "__main__":
    main()
