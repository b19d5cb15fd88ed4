"""Load every hostile ``.pt2`` with every loader, under the audit hook of ``_hostile_worker``.

Run as ``python tests/_hostile_pt2_worker.py CORPUS_DIR INDEX_JSON``; prints one JSON
object: what each loader raised per case, and the audit events seen while the
loaders ran (process spawns, exec/compile, imports of modules not loaded before,
files opened for writing). ``--control`` instead loads each case named in
``_hostile_pt2.CONTROL`` with plain ``torch.export.load`` and reports which
created the marker.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import _hostile_worker as audit


def control(corpus: Path) -> None:
    import torch

    from _hostile_pt2 import CONTROL, MARKER

    ran = {}
    for name, call in CONTROL.items():
        marker = corpus / MARKER
        marker.unlink(missing_ok=True)
        try:
            program = torch.export.load(corpus / f"{name}.pt2")
            if call:
                program.module()(torch.randn(2, 4))
        except Exception:  # torch often fails after the payload ran: only the marker counts
            pass
        ran[name] = marker.exists()
        marker.unlink(missing_ok=True)
    print(json.dumps(ran))


def main() -> None:
    if sys.argv[1] == "--control":
        control(Path(sys.argv[2]))
        return
    corpus, index_file = Path(sys.argv[1]), Path(sys.argv[2])
    cases = json.loads(index_file.read_text())
    import numpy  # noqa: F401
    import torch

    import torchkeep
    from _hostile_pt2 import Tiny, benign_archive, write_zip

    model = Tiny()

    def loaders(path: Path) -> dict[str, object]:
        return {
            "load_model": audit._outcome(lambda: torchkeep.load_model(path)),
            "load_weights": audit._outcome(lambda: torchkeep.load_weights(path)),
            "load_into": audit._outcome(lambda: torchkeep.load_into(model, path)),
            "summarize": audit._outcome(lambda: torchkeep.summarize(path)),
            "scan": audit._outcome(lambda: torchkeep.scan(path).verdict),
        }

    # warm up every path once (benign, refused, damaged) so lazy imports happen before the hook is armed
    with tempfile.TemporaryDirectory() as tmp:
        benign = Path(tmp) / "benign.pt2"
        torchkeep.save_model(model, benign, example_inputs=(torch.randn(2, 4),))
        records = benign_archive()
        refused = Path(tmp) / "refused.pt2"
        write_zip(refused, {**records, "tiny/extra.bin": b"x"})
        cut = Path(tmp) / "cut.pt2"
        cut.write_bytes(benign.read_bytes()[:-40])
        for path in (benign, refused, cut):
            loaders(path)
    audit._known_modules.update(sys.modules)
    sys.addaudithook(audit._hook)
    audit.ARMED = True
    results = {case["name"]: loaders(corpus / case["file"]) for case in cases}
    audit.ARMED = False
    print(json.dumps({"results": results, "violations": audit.VIOLATIONS}))


if __name__ == "__main__":
    main()
