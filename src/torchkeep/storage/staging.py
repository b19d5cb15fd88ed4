"""Host buffers that hold a snapshot of a training state while it is written in the background.

An asynchronous save copies every tensor once into a buffer kept per key and
reused by the next save (no new allocation once shapes settle), pinned when
the tensor is on a GPU so the copy runs at full bus speed. The model can
change the moment the copy is done; the writer only ever reads the buffers.
"""

from __future__ import annotations

import torch

__all__ = ["StagingBuffers"]


class StagingBuffers:
    """One reusable host buffer per tensor key."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self._cuda_copies = False

    def copy(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor``'s values in the buffer kept for ``key`` (made anew when its shape changed)."""
        buffer = self._buffers.get(key)
        on_gpu = tensor.device.type == "cuda"
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=on_gpu)
            self._buffers[key] = buffer
        buffer.copy_(tensor, non_blocking=on_gpu)
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
