"""An exponential moving average (EMA) of a model's weights, checkpointed like any Stateful.

:class:`EMA` keeps one shadow tensor per entry of ``model.state_dict()``
(tied weights share one, as in the model): floating-point parameters and
buffers are averaged, integer and bool buffers (``num_batches_tracked``) are
copied. It is updated in place on the shadow's device with ``torch._foreach``
kernels, one launch per group of tensors of one device and dtype, under
``torch.no_grad()``. Its ``state_dict()`` / ``load_state_dict()`` let it ride
in a :class:`~torchkeep.Checkpointer` (``ema=ema``) or a single-file
checkpoint, and :meth:`EMA.model_state_dict` is what
:func:`torchkeep.save_weights` writes for it: a plain state dict of the model.
"""

from __future__ import annotations

import logging
import math
import numbers
import sys
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from torchkeep.distributed import is_sharded, unwrap
from torchkeep.errors import (
    CallOrderError,
    InvalidArgumentError,
    KeyMismatchError,
    LowPrecisionWarning,
    NotAStateDictError,
    ShapeMismatch,
)
from torchkeep.weights import _view_identity

__all__ = ["EMA"]

logger = logging.getLogger(__name__)

_STATE_KEYS = ("decay", "warmup", "warmup_power", "num_updates", "weights")


_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _check_fraction(name: str, value: object, fix: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidArgumentError(name, value, f"is a {type(value).__name__}, not a number", fix)
    number = float(value)
    if not (math.isfinite(number) and 0.0 < number < 1.0):
        raise InvalidArgumentError(name, value, "is not strictly between 0 and 1", fix)
    return number


def _inner(model: nn.Module) -> nn.Module:
    """The module inside DDP / DataParallel wrappers and ``torch.compile``'s ``OptimizedModule``."""
    while True:
        model = unwrap(model)
        # no compiled module can exist unless dynamo was imported; importing it here would cost seconds
        frame = sys.modules.get("torch._dynamo.eval_frame")
        compiled = getattr(frame, "OptimizedModule", None)
        if compiled is None or not isinstance(model, compiled):
            return model
        model = model._orig_mod


def _kept_dtype(value: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype of ``value``'s average: ``dtype`` for a narrower floating tensor, else its own."""
    if dtype is not None and value.is_floating_point() and value.dtype.itemsize < dtype.itemsize:
        return dtype
    return value.dtype


def _averaged(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


class EMA:
    """An exponential moving average of a model's parameters and buffers.

    After each optimizer step, ``update()`` moves every floating-point shadow
    tensor towards the model's: ``shadow = decay * shadow + (1 - decay) *
    weight`` (integer and bool buffers, like BatchNorm's
    ``num_batches_tracked``, are copied). The shadow starts as a copy of the
    model's weights when the EMA is made, so make it after loading pretrained
    weights and after changing the architecture (a new head), and restore it
    with the model (``ckpts.restore(model=m, ema=ema)``).

    With ``warmup=True`` the decay of the ``n``-th update is
    ``min(decay, 1 - (1 + n) ** -warmup_power)``, so the early average forgets
    the random start quickly (with the default power 2/3: 0.37 at the first
    update, 0.9 after about 30, 0.99 after about 1000, 0.999 after about
    31 600; power 3/4 reaches 0.999 after about 10 000). timm's
    ``ModelEmaV3`` ramps the same way.

    The EMA follows the model it was made from (the module inside a DDP or
    DataParallel wrapper, or inside ``torch.compile``'s wrapper: the keys are
    the module's own, without ``module.`` or ``_orig_mod.``). Keep a bfloat16
    or float16 model's average in float32 (``dtype=torch.float32``): at decay
    0.999 the step ``0.001 * (weight - shadow)`` is mostly below half a unit of
    their last place and would round away; without ``dtype=`` such a model
    gets a :class:`~torchkeep.LowPrecisionWarning`.

    Args:
        model (nn.Module): the model to average.
        decay (float, default 0.999): how much of the average each update
            keeps, strictly between 0 and 1 (0.999 averages over roughly the
            last 1000 updates, 0.9999 over 10 000).
        warmup (bool, default False): ramp the decay up from 0 over the first
            updates as above.
        warmup_power (float, default 2/3): the ramp's power, strictly between 0 and 1.
        device (str | torch.device | None, default None): where to keep the
            average (``"cpu"`` saves accelerator memory, at the cost of a copy
            per update); None keeps each tensor on the model's device.
        dtype (torch.dtype | None, default None): the least precision of the
            average: floating-point tensors narrower than it are averaged in
            it (``torch.float32`` for a bfloat16 / float16 model); tensors as
            wide or wider (a float64 buffer) keep their own dtype, since the
            average is never less precise than the model. None keeps each
            tensor's own.

    Raises:
        InvalidArgumentError: ``decay`` or ``warmup_power`` is not strictly
            between 0 and 1, ``dtype`` is not a floating-point dtype, or the
            model's state is DTensor-sharded (FSDP2).
        NotAStateDictError: the model's state dict holds something other than
            tensors, or tensors on the meta device.

    Warns:
        LowPrecisionWarning: the model has bfloat16 / float16 tensors, no
            ``dtype=`` was given, and so the average would be kept in them.

    Example:
        >>> ema = torchkeep.EMA(model, decay=0.999)
        >>> for x, y in loader:
        ...     loss_fn(model(x), y).backward()
        ...     optimizer.step()
        ...     optimizer.zero_grad()
        ...     ema.update()
        >>> with ema.applied(model), torchkeep.evaluating(model):
        ...     val_loss = evaluate(model)
        >>> ckpts.save(step, model=model, optimizer=optimizer, ema=ema)
        >>> torchkeep.save_weights(ema, "model-ema.safetensors")
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.999,
        *,
        warmup: bool = False,
        warmup_power: float = 2 / 3,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.decay = _check_fraction(
            "decay", decay, "pass the share of the average each update keeps, e.g. decay=0.999"
        )
        self.warmup_power = _check_fraction(
            "warmup_power", warmup_power, "pass e.g. warmup_power=2/3 (long runs) or 3/4 (shorter ones)"
        )
        self.warmup = bool(warmup)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise InvalidArgumentError(
                "dtype", dtype, "is not a floating-point dtype", "pass e.g. dtype=torch.float32, or None"
            )
        self.num_updates = 0
        self._swapped = 0  # how many applied() blocks hold the average in self._model now
        self._model = _inner(model)
        self._name = type(self._model).__name__
        live = self._model.state_dict()
        if is_sharded(live):
            raise InvalidArgumentError(
                "model",
                self._name,
                "holds DTensor-sharded (FSDP2 / tensor-parallel) state, which EMA does not average",
                "make the EMA of an unsharded (or DDP) model",
            )
        self._keys = list(live)
        self._alias: dict[str, str] = {}  # tied key -> the key whose shadow it shares
        self._shadow: dict[str, torch.Tensor] = {}
        seen: dict[tuple[Any, ...], str] = {}
        with torch.no_grad():
            for key, value in live.items():
                if not isinstance(value, torch.Tensor):
                    raise NotAStateDictError(
                        None,
                        f"a model whose state-dict entry {key!r} is a {type(value).__name__}",
                        hint="EMA averages tensors only; average a model whose state dict holds only tensors",
                    )
                if value.device.type == "meta":
                    raise NotAStateDictError(
                        None,
                        f"a model whose tensor {key!r} is on the meta device (it has no data)",
                        hint="materialize the model and load its weights before making the EMA",
                    )
                if value.numel() > 0:
                    identity = _view_identity(value)
                    if identity in seen:
                        self._alias[key] = seen[identity]
                        self._shadow[key] = self._shadow[seen[identity]]
                        continue
                    seen[identity] = key
                target = value.device if device is None else torch.device(device)
                self._shadow[key] = value.detach().to(
                    device=target, dtype=_kept_dtype(value, dtype), copy=True
                )
        self._own = [key for key in self._keys if key not in self._alias]
        self._copied = [key for key in self._own if not _averaged(self._shadow[key])]
        groups: dict[tuple[torch.device, torch.dtype], list[str]] = {}
        for key in self._own:
            t = self._shadow[key]
            if _averaged(t):
                groups.setdefault((t.device, t.dtype), []).append(key)
        self._groups = list(groups.values())
        low = sorted(
            {str(t.dtype).removeprefix("torch.") for t in self._shadow.values() if t.dtype in _LOW_PRECISION}
        )
        if dtype is None and low:
            warnings.warn(
                f"the EMA of {self._name} keeps its average in {' and '.join(low)}, where most steps "
                f"of {1 - self.decay:.3g} * (weight - average) round away; pass dtype=torch.float32 to "
                "keep it in float32 (the model stays as it is)",
                LowPrecisionWarning,
                stacklevel=2,
            )

    def __repr__(self) -> str:
        return (
            f"EMA({self._name}, decay={self.decay}, warmup={self.warmup}, num_updates={self.num_updates}, "
            f"{len(self._keys)} tensors)"
        )

    # -- averaging ---------------------------------------------------------------------------------

    def decay_at(self, n: int) -> float:
        """The decay the ``n``-th update uses (``decay``, or the warmup ramp's value while lower).

        Example:
            >>> torchkeep.EMA(model, decay=0.999, warmup=True).decay_at(1)
            0.370...
        """
        if not self.warmup:
            return self.decay
        ramp: float = 1.0 - (1.0 + n) ** -self.warmup_power
        return min(self.decay, ramp)

    @torch.no_grad()
    def update(self) -> None:
        """Move the average one step towards the model's current weights (after ``optimizer.step()``).

        Raises:
            KeyMismatchError: the model's tensors changed names or shapes since
                the EMA was made (a new head, say): make the EMA after that.
            CallOrderError: it is called inside ``with ema.applied(model):``
                (the model then holds the average, not its trained weights).
        """
        if self._swapped:
            raise CallOrderError(
                "EMA.update()",
                "was called inside `with ema.applied(...)`, where the model holds the average, so the "
                "average would move towards itself and the step be lost",
                "call update() after optimizer.step() outside the block (evaluate inside it)",
            )
        live = self._live(self._model, "update")
        weight = 1.0 - self.decay_at(self.num_updates + 1)
        for keys in self._groups:
            shadows = [self._shadow[k] for k in keys]
            device, dtype = shadows[0].device, shadows[0].dtype
            current = [live[k] for k in keys]
            if any(t.device != device for t in current):  # one tensor at a time: bounded memory
                for s, t in zip(shadows, current, strict=True):
                    s.lerp_(t.to(device=device, dtype=dtype), weight)
            elif all(t.dtype == dtype for t in current):
                torch._foreach_lerp_(shadows, current, weight)
            else:  # add_ promotes in its kernel, so no cast copy of the model is made
                torch._foreach_mul_(shadows, 1.0 - weight)
                torch._foreach_add_(shadows, current, alpha=weight)
        for key in self._copied:
            self._shadow[key].copy_(live[key])
        self.num_updates += 1

    def _live(self, model: nn.Module, doing: str) -> dict[str, torch.Tensor]:
        """``model``'s state dict, checked to have the EMA's keys and shapes (in any order)."""
        live = model.state_dict()
        mismatched = [
            ShapeMismatch(k, tuple(self._shadow[k].shape), tuple(live[k].shape))
            for k in self._own
            if k in live and live[k].shape != self._shadow[k].shape
        ]
        if not mismatched and live.keys() == self._shadow.keys():
            return live
        raise KeyMismatchError(
            model_name=f"the model ({type(model).__name__}) given to {doing}",
            missing=[k for k in live if k not in self._shadow],
            unexpected=[k for k in self._keys if k not in live],
            mismatched=mismatched,
            loaded=sum(1 for k in self._keys if k in live) - len(mismatched),
            hint=f"{doing} with the model the EMA was made from, and make the EMA after any change to "
            "its layers (here the 'file' is the EMA, the 'model' the model given)",
        )

    # -- using the average -------------------------------------------------------------------------

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The average as a state dict of the model: the keys of ``model.state_dict()``, in its order.

        Tied keys share one tensor, as in the model. The tensors are the EMA's
        own (not copies): clone them to keep a snapshot while training goes on.
        :func:`torchkeep.save_weights` writes this for an EMA.

        Example:
            >>> torchkeep.load_into(eval_model, ema.model_state_dict())
        """
        return {key: self._shadow[key] for key in self._keys}

    @contextmanager
    def applied(self, model: nn.Module | None = None) -> Iterator[nn.Module]:
        """Swap the average into the model for the block; the live weights come back afterwards.

        The model's own tensors are copied aside (one copy of its weights, on
        its device) and copied back when the block ends, also when it raises;
        any change made to the weights inside the block is undone. Combine
        with :func:`torchkeep.evaluating` for eval mode.

        Args:
            model (nn.Module | None, default None): the model to swap into, the
                one the EMA follows by default, or another of the same
                architecture (an evaluation copy).

        Yields:
            The model (the module inside a DDP / DataParallel wrapper).

        Raises:
            KeyMismatchError: ``model`` does not have the EMA's keys and shapes.

        Example:
            >>> with ema.applied(model), torchkeep.evaluating(model):
            ...     val_loss = evaluate(model)
        """
        target = self._model if model is None else _inner(model)
        live = self._live(target, "applied()")
        with torch.no_grad():
            saved = {key: live[key].detach().clone() for key in self._own}
            try:
                for key in self._own:
                    live[key].copy_(self._shadow[key])
            except BaseException:
                for key in self._own:
                    live[key].copy_(saved[key])
                raise
        own = target is self._model
        self._swapped += own
        try:
            yield target
        finally:
            self._swapped -= own
            with torch.no_grad():
                for key in self._own:
                    live[key].copy_(saved[key])

    # -- Stateful ----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The average and its settings, for a checkpoint.

        ``weights`` holds the EMA's own tensors (not copies), as an optimizer's
        ``state_dict()`` does; ``decay``, ``warmup`` and ``warmup_power`` are
        recorded for reference (``load_state_dict`` keeps the ones the EMA was
        made with).

        Example:
            >>> torch.save({"ema": ema.state_dict()}, "ema.pt")
        """
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "warmup_power": self.warmup_power,
            "num_updates": self.num_updates,
            "weights": self.model_state_dict(),
        }

    def check_state_dict(self, state_dict: Mapping[str, Any], /) -> None:
        """Refuse a state :meth:`load_state_dict` could not take, changing nothing.

        A checkpoint restore (:func:`torchkeep.load_checkpoint`,
        ``Checkpointer.restore``) calls this for the EMA before it loads the
        model or any other object, so an EMA that does not fit leaves them all
        as they were.

        Raises:
            NotAStateDictError: ``state_dict`` is not an EMA state.
            KeyMismatchError: its weights are not this model's (other keys or shapes).

        Example:
            >>> ema.check_state_dict(torch.load("ema.pt", weights_only=True)["ema"])
        """
        if not isinstance(state_dict, Mapping) or not isinstance(state_dict.get("weights"), Mapping):
            found = (
                f"a dict with keys {sorted(map(str, state_dict))}"
                if isinstance(state_dict, Mapping)
                else f"a {type(state_dict).__name__}"
            )
            raise NotAStateDictError(
                None, found, hint=f"pass what EMA.state_dict() returned (keys: {', '.join(_STATE_KEYS)})"
            )
        weights: Mapping[str, Any] = state_dict["weights"]
        count = state_dict.get("num_updates", 0)
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise NotAStateDictError(
                None,
                f"an EMA state whose num_updates is {count!r}",
                hint="pass what EMA.state_dict() returned, unchanged",
            )
        for key, value in weights.items():
            if not isinstance(value, torch.Tensor):
                raise NotAStateDictError(
                    None,
                    f"an EMA state whose weight {key!r} is a {type(value).__name__}",
                    hint="pass what EMA.state_dict() returned, unchanged",
                )
        mismatched = [
            ShapeMismatch(k, tuple(weights[k].shape), tuple(self._shadow[k].shape))
            for k in self._own
            if k in weights and weights[k].shape != self._shadow[k].shape
        ]
        if set(weights) != set(self._keys) or mismatched:
            raise KeyMismatchError(
                model_name=f"the EMA of {self._name}",
                missing=[k for k in self._keys if k not in weights],
                unexpected=[k for k in weights if k not in self._shadow],
                mismatched=mismatched,
                loaded=sum(1 for k in self._keys if k in weights) - len(mismatched),
                hint=f"make the EMA from the model the saved one averaged (the same {self._name} "
                "architecture, after the same head changes), or restore without ema=",
            )

    def load_state_dict(self, state_dict: Mapping[str, Any], /) -> None:
        """Restore the average and the update count from :meth:`state_dict`'s output.

        Every check (:meth:`check_state_dict`) runs before anything changes.
        The settings (``decay``, ``warmup``) stay the ones this EMA was made
        with, so a resumed run may change them on purpose; values are cast to
        the EMA's dtypes.

        Raises:
            NotAStateDictError: ``state_dict`` is not an EMA state.
            KeyMismatchError: its weights are not this model's (other keys or shapes).

        Example:
            >>> ema.load_state_dict(torch.load("ema.pt", weights_only=True)["ema"])
        """
        self.check_state_dict(state_dict)
        weights: Mapping[str, torch.Tensor] = state_dict["weights"]
        count: int = state_dict.get("num_updates", 0)
        with torch.no_grad():
            for key in self._own:
                self._shadow[key].copy_(weights[key])
        self.num_updates = count
        logger.debug("restored an EMA of %s after %d updates", self._name, count)
