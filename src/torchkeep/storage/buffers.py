"""Large host buffers that fill fast: anonymous memory backed by transparent huge pages.

Reading a file into a fresh ``torch.empty`` buffer costs as much in page
faults as in copying: one fault per 4 KiB page (16k for 64 MiB), each taking
the process's memory-map lock, which also stalls every other thread that
allocates meanwhile (the pickle interpreter building tensors beside the
reader threads ran at half speed). Anonymous memory advised
``MADV_HUGEPAGE`` faults once per 2 MiB: reading 64 MiB from the page cache
took 16.5 ms into it against 40 ms into ``torch.empty`` here. Where the
kernel or platform has no huge pages the advice is a no-op or skipped, and
small buffers use ``torch.empty`` (nothing to gain below a huge page), and
so do very large ones (see ``_HUGE_UP_TO``).
"""

from __future__ import annotations

import contextlib
import mmap

import torch

__all__ = ["host_buffer"]

_HUGE_FROM = 4 << 20
# Above this, plain pages: with the kernel's default THP defrag setting ("madvise") a fault in
# an advised region compacts memory synchronously when no free huge page is left, and a 4 GiB
# buffer took 14 s to fill on a machine whose memory the page cache had fragmented.
_HUGE_UP_TO = 256 << 20


def host_buffer(nbytes: int) -> torch.Tensor:
    """A new uint8 CPU tensor of ``nbytes`` (contents undefined), huge-page backed from 4 to 256 MiB.

    The tensor's storage keeps the mapping alive, as do slices of that storage;
    it is unmapped when the last of them is freed.
    """
    if not _HUGE_FROM <= nbytes <= _HUGE_UP_TO or not hasattr(mmap, "MAP_ANONYMOUS"):
        return torch.empty(nbytes, dtype=torch.uint8)
    try:
        region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError:  # no room for a mapping: let the allocator say so, or succeed
        return torch.empty(nbytes, dtype=torch.uint8)
    advise = getattr(region, "madvise", None)
    huge = getattr(mmap, "MADV_HUGEPAGE", None)
    if advise is not None and huge is not None:
        with contextlib.suppress(OSError):  # a kernel without transparent huge pages: plain pages
            advise(huge)
    return torch.frombuffer(region, dtype=torch.uint8)
