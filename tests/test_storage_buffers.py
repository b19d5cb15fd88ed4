"""Huge-page host buffers: plain uint8 tensors whose storage slices keep the mapping alive."""

from __future__ import annotations

import gc

import torch

from torchkeep.storage.buffers import host_buffer


def test_a_large_buffer_is_writable_and_its_slices_outlive_it() -> None:
    buffer = host_buffer(8 << 20)
    assert buffer.dtype == torch.uint8
    assert buffer.numel() == 8 << 20
    buffer.fill_(7)
    part = buffer.untyped_storage()[4096 : 4096 + 64]
    del buffer
    gc.collect()
    kept = torch.empty(0, dtype=torch.uint8).set_(part)
    assert torch.equal(kept, torch.full((64,), 7, dtype=torch.uint8))
    assert part.nbytes() == 64


def test_small_and_empty_buffers_are_plain_tensors() -> None:
    assert host_buffer(0).numel() == 0
    small = host_buffer(1000)
    assert small.numel() == 1000
    assert small.untyped_storage().resizable()  # torch.empty: nothing to gain below a huge page
