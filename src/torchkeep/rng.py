"""Random-number-generator state: captured as plain data, restored loudly.

The state is kept in types that ``torch.load(weights_only=True)`` reads
(tuples, ints, tensors), so a checkpoint holding it needs no allowlist.
"""

from __future__ import annotations

import random
import warnings
from typing import Any

import torch

from torchkeep.errors import RngRestoreWarning

__all__ = ["capture_rng_state", "restore_rng_state"]


def capture_rng_state() -> dict[str, Any]:
    """The state of Python's ``random``, NumPy's global generator, torch CPU and every CUDA device."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np
    except ImportError:
        pass
    else:
        saved: Any = np.random.get_state(legacy=True)
        kind, keys, pos, has_gauss, cached = saved
        state["numpy"] = {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def _warn(message: str) -> None:
    warnings.warn(message, RngRestoreWarning, stacklevel=3)


def restore_rng_state(state: dict[str, Any]) -> list[str]:
    """Restore what :func:`capture_rng_state` captured.

    Every generator that cannot be restored (a saved CUDA state on a machine
    with fewer GPUs, NumPy missing, a damaged entry) is named in a
    :class:`RngRestoreWarning`; nothing is skipped silently.

    Returns:
        The generators restored, e.g. ``["python", "numpy", "torch"]``.
    """
    restored: list[str] = []
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        restored.append("python")
    if "numpy" in state:
        try:
            import numpy as np
        except ImportError:
            _warn("the checkpoint holds NumPy's random state but NumPy is not installed; not restored")
        else:
            saved = state["numpy"]
            np.random.set_state(
                (
                    saved["kind"],
                    saved["keys"].numpy().astype(np.uint32),
                    saved["pos"],
                    saved["has_gauss"],
                    saved["cached_gaussian"],
                )
            )
            restored.append("numpy")
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
        restored.append("torch")
    cuda_states = state.get("cuda") or []
    if cuda_states:
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if available < len(cuda_states):
            _warn(
                f"the checkpoint holds the random state of {len(cuda_states)} CUDA device(s) but "
                f"{available} are available here; the states of devices "
                f"{list(range(available, len(cuda_states)))} were not restored, so random numbers "
                "drawn on CUDA will differ from the original run"
            )
        for index, device_state in enumerate(cuda_states[:available]):
            torch.cuda.set_rng_state(device_state.cpu(), index)
        if available:
            restored.append("cuda")
    return restored
