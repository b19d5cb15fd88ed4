"""Early stopping whose state travels with the checkpoint."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torchkeep.errors import MissingMetricError

__all__ = ["EarlyStopping"]


class EarlyStopping:
    """Stop when a metric has not improved for ``patience`` checks.

    It is :class:`Stateful`: pass it to ``Checkpointer.save(..., stopper=stopper)``
    and ``restore(..., stopper=stopper)`` so a resumed run keeps counting
    where it left off.

    Args:
        monitor (str): the metric's name.
        patience (int): checks without improvement before stopping.
        min_delta (float, default 0.0): the least change that counts as improvement.
        mode (str, default "min"): ``"min"`` or ``"max"``.

    Example:
        >>> stopper = torchkeep.EarlyStopping("val_loss", patience=5)
        >>> for epoch in range(100):
        ...     if stopper.step({"val_loss": validate()}):
        ...         break
    """

    def __init__(self, monitor: str, *, patience: int, min_delta: float = 0.0, mode: str = "min") -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be a positive int, got {patience!r}")
        if min_delta < 0:
            raise ValueError(f"min_delta must be >= 0, got {min_delta!r}")
        self.monitor = monitor
        self.patience = patience
        self.min_delta = float(min_delta)
        self.mode = mode
        self.best: float | None = None
        self.bad_checks = 0
        self.should_stop = False

    def _improves(self, value: float) -> bool:
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def step(self, metrics: Mapping[str, Any] | float) -> bool:
        """Record one check; True when training should stop.

        Args:
            metrics (Mapping[str, Any] | float): the metrics (or the monitored value itself).

        Raises:
            MissingMetricError: ``metrics`` lacks the monitored name.
        """
        if isinstance(metrics, Mapping):
            if self.monitor not in metrics:
                raise MissingMetricError(self.monitor, list(metrics), where="EarlyStopping")
            raw = metrics[self.monitor]
        else:
            raw = metrics
        value = float(raw.item() if hasattr(raw, "item") else raw)
        if not math.isnan(value) and self._improves(value):
            self.best = value
            self.bad_checks = 0
        else:
            self.bad_checks += 1
        self.should_stop = self.bad_checks >= self.patience
        return self.should_stop

    def state_dict(self) -> dict[str, Any]:
        """Plain data: the settings and the counters."""
        return {
            "monitor": self.monitor,
            "patience": self.patience,
            "min_delta": self.min_delta,
            "mode": self.mode,
            "best": self.best,
            "bad_checks": self.bad_checks,
            "should_stop": self.should_stop,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a saved state (the saved monitor must match)."""
        if state.get("monitor") != self.monitor or state.get("mode") != self.mode:
            raise ValueError(
                f"this EarlyStopping monitors {self.monitor!r} ({self.mode}) but the saved one monitored "
                f"{state.get('monitor')!r} ({state.get('mode')}); create it with the same monitor and mode"
            )
        self.best = state["best"]
        self.bad_checks = int(state["bad_checks"])
        self.should_stop = bool(state["should_stop"])
