"""Other libraries' saved RNG states, turned into torchkeep's format without running their code.

HF Trainer's ``rng_state.pth`` and accelerate's ``random_states_<i>.pkl``
hold ``np.random.get_state()``, whose key array is a pickled NumPy array:
read in opaque mode it is an inert placeholder naming
``numpy._core.multiarray._reconstruct`` with the array's raw bytes as its
state. :func:`numpy_keys` reads those bytes itself (a little-endian
``uint32`` array of 624 words, nothing else), so NumPy's generator is
restored without unpickling; anything else is skipped and said so.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from torchkeep.safety.opaque import Opaque

__all__ = ["from_accelerate", "from_hf_trainer", "numpy_keys"]

_RECONSTRUCT = {"numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct"}
_MT_WORDS = 624


def numpy_keys(array: Any) -> torch.Tensor | None:
    """The MT19937 key words of a pickled NumPy ``uint32`` array placeholder (int64), or None."""
    if not (type(array) is Opaque and array.name in _RECONSTRUCT and array.how == "call"):
        return None
    state = array.state
    if not (type(state) is tuple and len(state) == 5):
        return None
    _version, shape, dtype, fortran, raw = state
    if shape != (_MT_WORDS,) or fortran is not False or type(raw) is not bytes or len(raw) != 4 * _MT_WORDS:
        return None
    if not (type(dtype) is Opaque and dtype.name == "numpy.dtype" and dtype.args[:1] == ("u4",)):
        return None
    order = dtype.state[1] if type(dtype.state) is tuple and len(dtype.state) > 1 else None
    if order not in ("<", "=", "|"):
        return None
    words = torch.frombuffer(bytearray(raw), dtype=torch.int32).to(torch.int64)
    return words & 0xFFFFFFFF


def _numpy(value: Any) -> dict[str, Any] | None:
    if not (type(value) is tuple and len(value) == 5 and value[0] == "MT19937"):
        return None
    keys = numpy_keys(value[1])
    _, _, pos, has_gauss, cached = value
    if keys is None or type(pos) is not int or type(has_gauss) is not int or type(cached) is not float:
        return None
    return {"kind": "MT19937", "keys": keys, "pos": pos, "has_gauss": has_gauss, "cached_gaussian": cached}


def _python(value: Any) -> Any:
    if (
        type(value) is tuple
        and len(value) == 3
        and value[0] == 3
        and type(value[1]) is tuple
        and len(value[1]) == 625
        and all(type(v) is int for v in value[1])
        and (value[2] is None or type(value[2]) is float)
    ):
        return value
    return None


def _convert(
    state: Mapping[str, Any], names: Mapping[str, str], skipped: list[str], where: str
) -> dict[str, Any] | None:
    """Pick python/numpy/torch/cuda out of ``state`` by ``names`` (our name -> theirs)."""
    out: dict[str, Any] = {}
    for ours, theirs in names.items():
        if theirs not in state:
            continue
        value = state[theirs]
        if ours == "python":
            converted = _python(value)
        elif ours == "numpy":
            converted = _numpy(value)
        elif ours == "torch":
            converted = value if isinstance(value, torch.Tensor) and value.dtype == torch.uint8 else None
        else:
            values = value if isinstance(value, list | tuple) else [value]
            ok = all(isinstance(v, torch.Tensor) and v.dtype == torch.uint8 for v in values)
            converted = list(values) if ok else None
        if converted is None:
            skipped.append(
                f"{where}: the {ours} RNG state {theirs!r} is not in a form torchkeep reads safely"
            )
        else:
            out[ours] = converted
    return out or None


def from_hf_trainer(state: Any, skipped: list[str], where: str) -> dict[str, Any] | None:
    """torchkeep's RNG state from HF Trainer's ``rng_state.pth`` content (None if nothing was readable)."""
    if not isinstance(state, Mapping):
        skipped.append(f"{where} is not a dict of RNG states")
        return None
    names = {"python": "python", "numpy": "numpy", "torch": "cpu", "cuda": "cuda"}
    return _convert(state, names, skipped, where)


def from_accelerate(state: Any, skipped: list[str], where: str) -> dict[str, Any] | None:
    """torchkeep's RNG state from accelerate's ``random_states_<i>.pkl`` content."""
    if not isinstance(state, Mapping):
        skipped.append(f"{where} is not a dict of RNG states")
        return None
    names = {
        "python": "random_state",
        "numpy": "numpy_random_seed",
        "torch": "torch_manual_seed",
        "cuda": "torch_cuda_manual_seed",
    }
    return _convert(state, names, skipped, where)
