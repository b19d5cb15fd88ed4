"""Save on preemption: record the scheduler's signal, agree on it across ranks, time the saves.

Spot instances, SLURM and Kubernetes stop a job with a signal (``SIGTERM``,
or ``SIGUSR1`` sent ahead of the time limit) and kill it a grace period later.
``Checkpointer(..., preemption=True)`` installs a handler that only records
the signal; the training loop reads ``ckpts.preempted`` at its step boundary,
saves an ordinary checkpoint and stops, and the script exits normally. Doing
nothing but recording in the handler is what makes this work wherever the
signal lands (inside a step, an evaluation, a save, a collective): the loop
decides at a point where the state is whole.

Under ``torch.distributed`` the answer is collective: each read is an
``all_reduce(MAX)`` of one integer on a gloo group of its own, so every rank
gets the same answer at the same read, also when only one rank (one node) got
the signal. A ``True`` answer stays ``True`` without further collectives.

Each save's duration (from ``save()`` to its commit, background writes
included) is recorded; with ``grace_period=`` a save that would not fit in it
warns once (:class:`~torchkeep.GracePeriodWarning`).
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any, TypeAlias

import torch
import torch.distributed as dist

from torchkeep.errors import GracePeriodWarning, SignalHandlerError

__all__ = ["DEFAULT_SIGNALS", "REQUEUE_EXIT_CODE", "Preemption", "PreemptionOption", "parse_signals"]

logger = logging.getLogger(__name__)

#: The signals ``preemption=True`` handles: what Kubernetes, spot instances and
#: SLURM's time limit send (``SIGTERM``), and what SLURM's ``--signal=USR1@90``
#: is usually set up to send ahead of it (``SIGUSR1``).
DEFAULT_SIGNALS = ("SIGTERM", "SIGUSR1")

#: The exit code to end a preempted run with when the batch script should requeue it
#: (``EX_TEMPFAIL`` of ``sysexits.h``: "temporary failure, retry"); see the README's
#: "Save on preemption" for the SLURM batch script that requeues on it.
REQUEUE_EXIT_CODE = 75

#: What ``Checkpointer(preemption=...)`` takes: ``True`` (:data:`DEFAULT_SIGNALS`),
#: ``False``, or signal names / numbers.
PreemptionOption: TypeAlias = "bool | str | int | Sequence[str | int]"

_Handler: TypeAlias = "Callable[[int, FrameType | None], Any] | int | None"
_UNCATCHABLE = {"SIGKILL", "SIGSTOP"}
_RECENT_SAVES = 1024


def parse_signals(option: PreemptionOption) -> tuple[signal.Signals, ...]:
    """The signals ``option`` names, in order, without repeats.

    Args:
        option (bool | str | int | Sequence[str | int]): ``True`` for
            :data:`DEFAULT_SIGNALS`, ``False`` for none, or names (``"SIGTERM"``
            or ``"TERM"``, any case) and numbers.

    Raises:
        SignalHandlerError: a name or number that is no signal here, or one no process can catch.
    """
    if option is True:  # those of them this platform has (Windows has no SIGUSR1)
        option = [name for name in DEFAULT_SIGNALS if hasattr(signal, name)]
    elif option is False:
        return ()
    items: Sequence[str | int] = [option] if isinstance(option, str | int) else list(option)
    found: list[signal.Signals] = []
    for item in items:
        sig = _one_signal(item)
        if sig not in found:
            found.append(sig)
    return tuple(found)


def _one_signal(item: str | int) -> signal.Signals:
    known = ", ".join((*DEFAULT_SIGNALS, "SIGUSR2", "SIGINT", "SIGHUP"))
    if isinstance(item, bool) or not isinstance(item, str | int):
        raise SignalHandlerError(
            repr(item), "it is neither a signal name nor a number", f"name one ({known})"
        )
    if isinstance(item, int):
        try:
            sig = signal.Signals(item)
        except ValueError:
            raise SignalHandlerError(
                str(item), "no signal has that number here", f"name one ({known})"
            ) from None
    else:
        name = item.strip().upper()
        name = name if name.startswith("SIG") else f"SIG{name}"
        if not isinstance(getattr(signal, name, None), signal.Signals):
            raise SignalHandlerError(item, "this platform has no signal of that name", f"name one ({known})")
        sig = signal.Signals[name]
    if sig.name in _UNCATCHABLE:
        raise SignalHandlerError(
            sig.name,
            "no process can catch it (the kernel ends the process at once)",
            "ask the scheduler to send SIGTERM or SIGUSR1 first (SLURM: --signal=B:USR1@90)",
        )
    return sig


class Preemption:
    """The preemption signals of one Checkpointer: handlers, the agreed answer, save durations.

    Built by :class:`~torchkeep.Checkpointer` (``preemption=``, ``grace_period=``)
    and reachable as ``ckpts.preemption``; read ``ckpts.preempted`` in the loop.

    The handler records the first signal and then calls the handler that was
    installed before it when that is a Python function (``SIG_DFL``,
    ``SIG_IGN`` and ``signal.default_int_handler`` are not called: the point is
    not to die or raise). ``close()`` puts the earlier handlers back. A process
    forked after the handlers were installed (a DataLoader worker) does what it
    did before: there the handler restores the earlier disposition and
    re-raises the signal.

    Args:
        signals (bool | str | int | Sequence[str | int], default False): see
            :func:`parse_signals`; nothing is installed for ``False`` / ``()``.
        grace_period (float | None, default None): seconds between the signal
            and the kill; a save that takes longer warns once.
        distributed (bool, default False): agree with the other ranks of the
            ``torch.distributed`` job (every rank must build it with the same
            signals, and read :meth:`poll` the same number of times).

    Raises:
        SignalHandlerError: an unknown or uncatchable signal, or not in the main thread.
        ValueError: ``grace_period`` is not a positive number.
    """

    def __init__(
        self,
        signals: PreemptionOption = False,
        *,
        grace_period: float | None = None,
        distributed: bool = False,
    ) -> None:
        if grace_period is not None and (
            isinstance(grace_period, bool) or not isinstance(grace_period, int | float) or grace_period <= 0
        ):
            raise ValueError(f"grace_period must be a positive number of seconds, got {grace_period!r}")
        self.signals = parse_signals(signals)
        self.grace_period = None if grace_period is None else float(grace_period)
        #: the duration in seconds of each recent save (up to the last 1024), oldest first
        self.save_seconds: collections.deque[float] = collections.deque(maxlen=_RECENT_SAVES)
        self._caught: int | None = None  # written by the handler, read by poll()
        self._slowest = 0.0
        self._agreed: signal.Signals | None = None
        self._previous: dict[int, _Handler] = {}
        self._closed = False
        self._started: float | None = None
        self._saved_after = False
        self._warned = False
        self._pid = os.getpid()
        self._group: Any = None
        if self.signals and distributed and dist.is_available() and dist.is_initialized():
            # its own group: a background save's collectives on the Checkpointer's group may run meanwhile
            self._group = dist.new_group(backend="gloo")
        if self.signals:
            self._install()

    # -- handlers ----------------------------------------------------------------------------------

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise SignalHandlerError(
                self.signals[0].name,
                f"the Checkpointer is built in thread {threading.current_thread().name!r}, and Python "
                "runs signal handlers in the main thread only",
                "build it in the main thread (it may save from any thread afterwards), or pass "
                "preemption=False and handle the signal yourself",
            )
        for sig in self.signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except (OSError, ValueError) as err:
                self._restore()
                raise SignalHandlerError(sig.name, str(err), "leave it out of preemption=") from err
        logger.debug("preemption handlers installed for %s", ", ".join(s.name for s in self.signals))

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Only records: the loop saves at its next step boundary, where the state is whole.
        previous = self._previous.get(signum)
        if os.getpid() != self._pid:
            _act_as(previous, signum, frame)  # a forked child (DataLoader worker): as before the fork
            return
        if not self._closed and self._caught is None:
            self._caught = signum
        if callable(previous) and previous is not signal.default_int_handler:
            previous(signum, frame)

    def _restore(self) -> None:
        for sig, previous in self._previous.items():
            current = signal.getsignal(sig)
            if current != self._handle:  # someone installed over ours: theirs stays, ours passes through
                logger.debug("leaving the %s handler installed after torchkeep's in place", sig)
                continue
            target = _unwrap_closed(previous, sig)
            if target is None:  # installed from C: Python can neither call nor reinstall it
                logger.warning(
                    "the %s handler in place before the Checkpointer was not installed from Python and "
                    "cannot be put back; %s now has its default action",
                    signal.Signals(sig).name,
                    signal.Signals(sig).name,
                )
                target = signal.SIG_DFL
            signal.signal(sig, target)
        self._previous = {
            sig: p for sig, p in self._previous.items() if signal.getsignal(sig) == self._handle
        }

    def close(self) -> None:
        """Put the earlier handlers back (from the main thread; once is enough).

        After this, :meth:`poll` answers without a collective: the last agreed
        answer (in one process: whether a signal came).
        """
        if self._closed:
            return
        self._closed = True
        self._warn_if_slow(stacklevel=4)
        if self._agreed is not None and not self._saved_after:
            logger.warning(
                "%s was received and no checkpoint was saved after it: the run resumes from the one "
                "before (fine if it came before the first step; if not, save when ckpts.preempted is "
                "True: read it once per step and use that one answer for both the save and the break)",
                self._agreed.name,
            )
        if not self._previous:
            return
        if threading.current_thread() is not threading.main_thread():
            logger.warning(
                "the Checkpointer was closed outside the main thread: its preemption handlers stay "
                "installed (they only pass signals on to the earlier handlers now)"
            )
            return
        self._restore()

    # -- the answer --------------------------------------------------------------------------------

    @property
    def received(self) -> str | None:
        """The name of the signal the job agreed on (``"SIGTERM"``), or ``None`` before any."""
        return None if self._agreed is None else self._agreed.name

    def poll(self) -> bool:
        """Whether a preemption signal came (on any rank, under ``torch.distributed``).

        In a distributed job this is a collective (one ``all_reduce`` of an
        int64 on this object's gloo group) until the answer is ``True``; every
        rank must call it equally often. A ``True`` answer stays ``True``.

        Returns:
            ``True`` once a signal came: save, then stop.
        """
        self._warn_if_slow(stacklevel=4)
        if self._agreed is not None:
            return True
        received = self._caught or 0
        if self._group is not None and not self._closed:
            flag = torch.tensor([received], dtype=torch.int64)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
            received = int(flag.item())
        elif self._group is not None:
            received = 0  # no collective after close(): the answer stays the last agreed one
        if received:
            self._agreed = signal.Signals(received)
            where = "" if self._group is None else f" (rank {dist.get_rank()}: all ranks agree)"
            logger.warning("preemption: %s received%s; save and stop", self._agreed.name, where)
        return self._agreed is not None

    # -- save durations ----------------------------------------------------------------------------

    def save_started(self) -> None:
        """Mark the start of a save (the Checkpointer calls it; one save is in flight at most)."""
        self._warn_if_slow(stacklevel=5)
        self._started = time.perf_counter()
        if self._agreed is not None:
            self._saved_after = True

    def save_finished(self) -> None:
        """Record the duration of the save since :meth:`save_started` (once it is committed)."""
        started, self._started = self._started, None
        if started is None:
            return
        seconds = time.perf_counter() - started
        self.save_seconds.append(seconds)
        self._slowest = max(self._slowest, seconds)
        logger.debug("the save took %.3f s", seconds)
        if threading.current_thread() is threading.main_thread():
            self._warn_if_slow(stacklevel=5)
        # else: a background save; the main thread warns at its next call (warnings belong there)

    @property
    def last_save_seconds(self) -> float | None:
        """How long the latest committed save took, in seconds (``None`` before the first)."""
        return self.save_seconds[-1] if self.save_seconds else None

    def _warn_if_slow(self, *, stacklevel: int) -> None:
        if self.grace_period is None or self._warned or self._slowest <= self.grace_period:
            return
        slowest = self._slowest
        self._warned = True
        message = (
            f"a checkpoint save took {slowest:.3g} s, longer than the grace period of "
            f"{self.grace_period:g} s: a save started after a preemption signal would be killed before "
            "it commits (the run would resume from the checkpoint before). Ask for more time before "
            "the kill (SLURM --signal=B:USR1@<seconds>, Kubernetes terminationGracePeriodSeconds), "
            "save less, or save to faster storage."
        )
        logger.warning("%s", message)
        warnings.warn(message, GracePeriodWarning, stacklevel=stacklevel)


def _unwrap_closed(handler: _Handler, signum: int) -> _Handler:
    """The handler to reinstall: past the handlers of Preemptions closed meanwhile."""
    seen: set[int] = set()
    while True:
        owner = getattr(handler, "__self__", None)
        if not isinstance(owner, Preemption) or not owner._closed or id(owner) in seen:
            return handler
        seen.add(id(owner))
        handler = owner._previous.get(signum, signal.SIG_DFL)


def _act_as(previous: _Handler, signum: int, frame: FrameType | None) -> None:
    """Do what ``previous`` (a handler or disposition) would have done with the signal."""
    if callable(previous):
        previous(signum, frame)
    elif previous != signal.SIG_IGN:
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)
