"""Everything about a Checkpointer run folder, one job per module.

============  ==============================================================
layout        names, versions, manifest schema: every constant of the format
reader        list / verify / latest / best / open; reads only, never writes
retention     policies that compose (last N, best N, every N steps, every T)
snapshot      capture / apply a training state: what goes into which file
commit        prepare / write / agree / publish, in one process or many
checkpointer  Checkpointer: writer lock + commit + retention + async saves
preemption    save on preemption: signal handlers, the agreed answer, save timing
blobs         packs: each distinct tensor stored once, shared by checkpoints;
              the index of an incremental checkpoint, its reading, checking
              and the deletion of unused packs
export        one checkpoint copied out as a standalone folder
============  ==============================================================

Where a change goes: a retention policy is one class in ``retention``; a new
file in a step folder is a change to ``snapshot`` (plus its name in
``layout``); a new storage backend is one module in :mod:`torchkeep.storage`.
"""

from torchkeep.run.checkpointer import Checkpointer
from torchkeep.run.export import export_step
from torchkeep.run.reader import CheckpointEntry, RunReader
from torchkeep.run.retention import KeepAny, KeepBest, KeepEvery, KeepEveryInterval, KeepLast, Policy

__all__ = [
    "CheckpointEntry",
    "Checkpointer",
    "KeepAny",
    "KeepBest",
    "KeepEvery",
    "KeepEveryInterval",
    "KeepLast",
    "Policy",
    "RunReader",
    "export_step",
]
