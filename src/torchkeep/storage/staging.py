"""Host buffers that hold a snapshot of a training state while it is written in the background.

An asynchronous save copies every tensor once into a buffer kept per key and
reused by the next save (no new allocation once shapes settle), pinned when
the tensor is on a GPU so the copy runs at full bus speed. The model can
change the moment the copy is done; the writer only ever reads the buffers.

With a budget, the buffers never hold more than that many bytes: a tensor
that does not fit is left unstaged (:attr:`StagingBuffers.unstaged`) for the
caller to write before the model may change.
"""

from __future__ import annotations

import torch

__all__ = ["StagingBuffers"]


class StagingBuffers:
    """One reusable host buffer per tensor key, within an optional budget of bytes."""

    def __init__(self, budget: int | None = None) -> None:
        self.budget = budget
        self._buffers: dict[str, torch.Tensor] = {}
        self._cuda_copies = False
        self._this: set[str] = set()
        self.unstaged: set[str] = set()

    def begin(self) -> None:
        """Start a new snapshot: every key is free to be staged again."""
        self._this = set()
        self.unstaged = set()

    def _room(self, key: str, nbytes: int) -> bool:
        """Whether ``nbytes`` more fit, after dropping buffers this snapshot has not used."""
        if self.budget is None:
            return True
        used = sum(b.nbytes for k, b in self._buffers.items() if k in self._this)
        if used + nbytes > self.budget:
            return False
        held = sum(b.nbytes for k, b in self._buffers.items() if k != key)
        for other in [k for k in self._buffers if k not in self._this and k != key]:
            if held + nbytes <= self.budget:
                break
            held -= self._buffers.pop(other).nbytes  # a buffer of the last snapshot, not used yet
        return True

    def copy(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor``'s values in the buffer kept for ``key`` (made anew when its shape changed);
        ``tensor`` itself, listed in :attr:`unstaged`, when it does not fit the budget."""
        if not self._room(key, tensor.nbytes):
            self.unstaged.add(key)
            self._buffers.pop(key, None)
            return tensor
        buffer = self._buffers.get(key)
        on_gpu = tensor.device.type == "cuda"
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            self._buffers.pop(key, None)
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=on_gpu)
            self._buffers[key] = buffer
        buffer.copy_(tensor, non_blocking=on_gpu)
        self._this.add(key)
        self._cuda_copies |= on_gpu
        return buffer

    def settle(self, used: set[str]) -> None:
        """Wait for copies from the GPU to land; drop buffers of keys this snapshot did not use."""
        if self._cuda_copies:
            torch.cuda.synchronize()
            self._cuda_copies = False
        for key in set(self._buffers) - used:
            del self._buffers[key]

    @property
    def nbytes(self) -> int:
        """Host memory held by the buffers."""
        return sum(b.nbytes for b in self._buffers.values())
