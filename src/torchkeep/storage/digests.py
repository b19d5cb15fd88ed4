"""Content digests of tensors: the one definition of "the same tensor".

A tensor's digest is XXH3-128 over a short description (dtype and shape) and
then its bytes in row-major order, so two tensors have the same digest when
they hold the same values in the same dtype and shape, wherever they live
and however they are strided. Run folders store tensor data under these
digests (each distinct tensor once); adapter files name the frozen base they
belong to by :func:`state_digest`.

XXH3 is not a cryptographic hash: it guards against accidents (a changed
tensor, a damaged file), not against someone crafting two tensors with one
digest. That is the threat model of a run folder its own writer fills.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
import xxhash

__all__ = ["DIGEST_HEX_LENGTH", "is_digest", "state_digest", "tensor_digest"]

DIGEST_HEX_LENGTH = 32  # XXH3-128 as lowercase hex
_DIGEST = re.compile(f"[0-9a-f]{{{DIGEST_HEX_LENGTH}}}")


_DTYPE_NAMES: dict[torch.dtype, str] = {}


def _describe(t: torch.Tensor) -> bytes:
    name = _DTYPE_NAMES.get(t.dtype)
    if name is None:
        name = _DTYPE_NAMES[t.dtype] = str(t.dtype).removeprefix("torch.")
    return f"{name}{list(t.shape)}".encode()


def tensor_digest(t: torch.Tensor) -> str:
    """The content digest of ``t``: dtype, shape and bytes (a copy is made only when needed).

    A tensor on another device, or one that is not contiguous, is copied to
    contiguous host memory first; a contiguous CPU tensor is hashed where it lies.

    Example:
        >>> tensor_digest(torch.zeros(3)) == tensor_digest(torch.zeros(3))
        True
    """
    digest = xxhash.xxh3_128(_describe(t))
    if t.numel():
        data = t.detach() if t.requires_grad else t
        if not data.is_cpu:
            data = data.cpu()
        if not data.is_contiguous():
            data = data.contiguous()
        try:  # the array's own buffer: the same bytes, fewer steps (most of the time of small tensors)
            digest.update(data.numpy().data)
        except (TypeError, RuntimeError):  # dtypes NumPy lacks (bfloat16, float8, ...)
            digest.update(data.reshape(-1).view(torch.uint8).numpy().data)
    return str(digest.hexdigest())


def state_digest(digests: Mapping[str, str]) -> str:
    """One digest for a set of named tensors, from their names and :func:`tensor_digest` values."""
    combined = xxhash.xxh3_128()
    for name in sorted(digests):
        combined.update(name.encode("utf-8", "surrogatepass") + b"\x00" + digests[name].encode() + b"\n")
    return str(combined.hexdigest())


def is_digest(text: object) -> bool:
    """Whether ``text`` is a digest as :func:`tensor_digest` writes it."""
    return isinstance(text, str) and _DIGEST.fullmatch(text) is not None
