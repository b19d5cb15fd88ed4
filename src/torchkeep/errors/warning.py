"""torchkeep's warnings: :class:`TorchkeepWarning` and its subclasses."""

from __future__ import annotations

__all__ = [
    "GracePeriodWarning",
    "LowPrecisionWarning",
    "NonFiniteCheckpointWarning",
    "RngRestoreWarning",
    "TorchkeepWarning",
]


class TorchkeepWarning(UserWarning):
    """Base class of torchkeep's warnings."""


class RngRestoreWarning(TorchkeepWarning):
    """A saved random-number-generator state could not be restored (fully).

    Training then goes on with other random numbers than the original run
    would have drawn; the message says which generator and why.
    """


class NonFiniteCheckpointWarning(TorchkeepWarning):
    """A checkpoint was saved with NaN or Inf in its model tensors or its monitored metric.

    It is kept (training may want to inspect it) but flagged in its manifest,
    shown as poisoned by ``torchkeep ls`` / ``verify``, and never ranked best.
    """


class LowPrecisionWarning(TorchkeepWarning):
    """A running average is kept in a precision too low for its small steps.

    An :class:`torchkeep.EMA` of a bfloat16 or float16 model made without
    ``dtype=`` keeps its average in that dtype, where most steps of size
    ``(1 - decay) * (weight - average)`` round away; pass ``dtype=torch.float32``.
    """


class GracePeriodWarning(TorchkeepWarning):
    """A checkpoint save took longer than the grace period a preemption leaves.

    Issued once per Checkpointer (``Checkpointer(..., grace_period=30)``): a
    save started after the preemption signal would then be killed before it
    commits, and the run would resume from the checkpoint before it.
    """
