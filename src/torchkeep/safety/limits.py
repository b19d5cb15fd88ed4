"""Bounds checked before anything is allocated while reading a file.

A file may declare a shape of 10^15 elements or a zip member that inflates a
thousandfold; the readers compare every such number with these limits first
and raise :class:`~torchkeep.errors.LimitExceededError` instead of running out
of memory. The defaults admit any real model file; raise one with
``limits=Limits(max_bytes=...)`` when a file legitimately needs more.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BUILD_ALLOWANCE", "DEFAULT_LIMITS", "MAX_SAME_HASH", "Limits"]

_GiB = 1 << 30

BUILD_ALLOWANCE = 64 << 20
"""Bytes of objects any pickle may build whatever its size (small files are never refused)."""

MAX_SAME_HASH = 16
"""Distinct keys of one dict or set that may share a hash value.

Python hashes ints modulo 2**61 - 1 and tuples, floats and frozensets by
public formulas, so a file can hold 100,000 keys that all collide and make
building one dict take minutes (quadratic probing). Distinct keys with equal
full hashes are astronomically rare by chance; str and bytes keys (seeded
hashes) and ints below the modulus (hash is the value) cannot collide and are
not counted.
"""


@dataclass(frozen=True)
class Limits:
    """How much a file may ask for before torchkeep refuses to read it.

    Attributes:
        max_bytes (int, default 1 TiB): total tensor data (also the most a
            compressed member may inflate to).
        max_tensors (int, default 10_000_000): tensors (and zip members).
        max_numel (int, default 2**40): elements of one tensor.
        max_depth (int, default 200): nesting of lists, dicts and tuples.
        max_memo (int, default 50_000_000): pickle memo entries.
        max_string (int, default 256 MiB): one string or bytes value.
        max_pickle_bytes (int, default 4 GiB): the pickle stream itself (every
            opcode takes a byte, so this also bounds the work done).
        max_header_bytes (int, default 100 MiB): a safetensors JSON header.
        max_metadata (int, default 100_000): safetensors metadata entries.
        max_compression_ratio (int, default 100): inflated / compressed size
            of a zip member.
        max_build_ratio (int, default 128): bytes of Python objects a pickle
            may build per byte it takes in the file (stored size, so a
            compressed pickle gets no more than its share); the first
            :data:`BUILD_ALLOWANCE` bytes are always allowed. Sizes are
            estimated as they are built (8 bytes per pickle byte for stack and
            memo slots, plus each new container, string or dict entry), so a
            flood is refused before it is allocated. A ``torch.save`` pickle
            builds 3-15 bytes per byte.

    How the bounds cover a pickle's cost: every opcode is at least one byte,
    so time is linear in the pickle's size (``max_pickle_bytes``); memory is
    ``max_build_ratio`` times its stored size; memo entries are at most one
    per two pickle bytes (each needs an object before it) and ``max_memo``;
    dict and set keys may not share a hash more than
    :data:`MAX_SAME_HASH` times (hash flooding); tensor views count their
    logical size (``numel * itemsize``) against ``max_numel`` and, summed,
    against ``max_bytes``, as their storages do.
    """

    max_bytes: int = 1024 * _GiB
    max_tensors: int = 10_000_000
    max_numel: int = 1 << 40
    max_depth: int = 200
    max_memo: int = 50_000_000
    max_string: int = 256 << 20
    max_pickle_bytes: int = 4 * _GiB
    max_header_bytes: int = 100 << 20
    max_metadata: int = 100_000
    max_compression_ratio: int = 100
    max_build_ratio: int = 128


DEFAULT_LIMITS = Limits()
