"""Stopping a run cleanly: SIGTERM / Ctrl-C, and a loss that stops being finite.

Cluster schedulers preempt a job with SIGTERM and kill it some seconds later. While the trainer
is inside an epoch's batches (or writing a checkpoint) a signal only sets a flag: the trainer
finishes the batch it is on, writes a resumable ``last.pt`` at that batch boundary and stops,
so a preemption costs at most one batch. Anywhere else (re-clustering, validation) there is
nothing in progress worth keeping beyond the last checkpoint, so the signal stops the run at once.
A second signal always stops at once.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path

import torch

from dcml.errors import UserError

#: Exit codes of a run stopped by a signal: the shell's 128 + signal number.
EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}


class TrainingStopped(Exception):
    """A signal stopped the run; ``saved`` says what the last checkpoint holds (for the message)."""

    def __init__(self, signal_name: str, saved: str = ""):
        super().__init__(signal_name)
        self.signal_name = signal_name
        self.saved = saved

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signal_name, 1)


class TrainingDiverged(UserError):
    """The loss became NaN or infinite (the message says where, what was kept and what to try)."""


class NonFiniteLoss(Exception):
    """Raised by :class:`DivergenceWatch`; the trainer turns it into :class:`TrainingDiverged`."""

    def __init__(self, epoch: int, batch: int):
        super().__init__(f"non-finite loss at epoch {epoch}, batch {batch}")
        self.epoch, self.batch = epoch, batch


class StopSignals:
    """Turns SIGTERM and SIGINT into a stop request while a run is in :meth:`installed`.

    ``deferred()`` marks a stretch (the batch loop, a checkpoint write) where a signal only sets
    :attr:`requested`, for the trainer to act on at its next :meth:`check`; elsewhere the signal
    raises :class:`TrainingStopped` where the program is.
    """

    def __init__(self) -> None:
        self.requested: str | None = None
        self._deferring = 0

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - the signal module's signature
        name = signal.Signals(signum).name
        first = self.requested is None
        self.requested = self.requested or name
        if not first or not self._deferring:
            raise TrainingStopped(name)

    @contextlib.contextmanager
    def installed(self):
        """Handle SIGTERM and SIGINT for the duration (main thread only: elsewhere Python cannot)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    @contextlib.contextmanager
    def deferred(self):
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1

    def request(self, name: str = "SIGTERM") -> None:
        """Ask for a stop as a signal would (tests, and callers embedding the trainer)."""
        self.requested = self.requested or name


class DivergenceWatch:
    """Notices the first step whose loss is not finite, without waiting for the GPU every step.

    On the CPU the check is free and runs before the step is applied, so the weights never see
    the bad gradient. On CUDA each step only writes a flag on the device; the flags are read every
    ``window`` steps (when the progress bar reads the loss anyway) and before any checkpoint, so
    nothing saved ever holds weights trained past a non-finite loss.
    """

    def __init__(self, device: torch.device, window: int):
        self.window = 1 if device.type != "cuda" else window
        self._flags = torch.ones(self.window, dtype=torch.bool, device=device)
        self._steps: list[tuple[int, int]] = []  # (epoch, batch) of the steps not checked yet

    def record(self, loss: torch.Tensor, epoch: int, batch: int) -> None:
        self._flags[len(self._steps)] = torch.isfinite(loss.detach())
        self._steps.append((epoch, batch))
        if len(self._steps) == self.window:
            self.check()

    def check(self) -> None:
        if not self._steps:
            return
        flags = self._flags[: len(self._steps)].cpu().clone()  # .cpu() of a CPU tensor is the tensor itself
        steps, self._steps = self._steps, []
        self._flags.fill_(True)
        if not bool(flags.all()):
            epoch, batch = steps[int((~flags).nonzero()[0])]
            raise NonFiniteLoss(epoch, batch)


def divergence_message(epoch: int, batch: int, saved: str, learning_rates: dict[str, float], precision: str) -> str:
    """The one line a diverged run ends with: where, what was kept, what to try."""
    rates = ", ".join(f"{name} {rate:g}" for name, rate in learning_rates.items())
    hints = f"a learning rate too high for this data (now {rates}; try 10x lower with --set optimizer.lr_...)"
    if precision != "fp32":
        hints += ", or bf16 overflow (try --set runtime.precision=fp32)"
    return (f"training diverged: the loss was not finite at epoch {epoch + 1}, batch {batch + 1}; {saved}. "
            f"Likely cause: {hints}")


def kept_checkpoint(last: Path | None, epochs_done: int) -> str:
    """What a diverged run keeps, for :func:`divergence_message`: ``last`` is its ``last.pt``
    (None: this process writes no files); ``epochs_done``: the epochs that file holds when present."""
    if last is None:
        return "no checkpoint is written by this run"
    if not last.is_file():
        return "no checkpoint had been written yet"
    return f"{last} keeps the state after epoch {epochs_done}, before the bad step"
