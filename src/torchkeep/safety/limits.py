"""Bounds checked before anything is allocated while reading a file.

A file may declare a shape of 10^15 elements or a zip member that inflates a
thousandfold; the readers compare every such number with these limits first
and raise :class:`~torchkeep.errors.LimitExceededError` instead of running out
of memory. The defaults admit any real model file; raise one with
``limits=Limits(max_bytes=...)`` when a file legitimately needs more.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_LIMITS", "Limits"]

_GiB = 1 << 30


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


DEFAULT_LIMITS = Limits()
