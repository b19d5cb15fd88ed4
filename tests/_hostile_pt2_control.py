"""The control for the ``.pt2`` corpus: plain ``torch.export.load`` really runs the payloads.

Run as ``python tests/_hostile_pt2_control.py CORPUS_DIR``; loads each case
named in ``_hostile_pt2.CONTROL`` with ``torch.export.load`` (and calls the
module where the payload runs on the first call) and prints, as JSON, which
created the marker. Every entry point's refusal of the corpus is tested with
the other corpora in ``test_safety_hostile.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


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
    control(Path(sys.argv[1]))


if __name__ == "__main__":
    main()
