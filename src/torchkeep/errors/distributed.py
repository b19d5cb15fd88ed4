"""Errors of the group :class:`DistributedError`: a rank of a distributed job failed."""

from __future__ import annotations

from torchkeep.errors._base import DistributedError

__all__ = [
    "DistributedSaveError",
]


class DistributedSaveError(DistributedError, RuntimeError):
    """A rank of a ``torch.distributed`` job failed during a checkpoint save.

    Raised on every rank, so all of them leave ``save()`` together; the
    checkpoint was not committed and the earlier ones are intact.

    Attributes:
        step: the step whose save failed.
        stage: what the ranks were doing (``"write"``, ``"commit"``).
        failed: ``{rank: "ErrorType: message"}`` for each failed rank.

    Example:
        >>> try:
        ...     ckpts.save(step, model=model, optimizer=opt)
        ... except torchkeep.DistributedSaveError as err:
        ...     print(err.failed)  # {1: "OSError: [Errno 28] No space left on device"}
    """

    def __init__(self, step: int, stage: str, failed: dict[int, str]) -> None:
        self.step = step
        self.stage = stage
        self.failed = dict(failed)
        listed = "; ".join(f"rank {rank}: {text}" for rank, text in sorted(self.failed.items()))
        super().__init__(
            f"the checkpoint of step {step} failed during {stage} on {len(self.failed)} rank(s) ({listed}). "
            "Nothing was committed and the earlier checkpoints are intact; fix the cause on those ranks "
            "and save again."
        )
