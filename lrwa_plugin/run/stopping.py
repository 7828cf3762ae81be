"""Stopping a run with Ctrl-C (SIGINT) or SIGTERM: at the next iteration boundary, with a training state to resume.

While a run trains, :func:`stop_requests` turns the first SIGINT or SIGTERM into a request that the training loop
honours at the next point where its whole state can be saved: after an iteration (not the epoch's last: the epoch
ends first) or at an epoch end. It saves the training state there, exactly as ``--save_every`` would, and raises
:class:`RunStopped`, which the command line prints as one line naming the state file and the ``--resume`` command
(exit status 128 + the signal's number: 130 for SIGINT, 143 for SIGTERM). Resuming from it continues bit for bit.
A second signal stops at once (:class:`StoppedAtOnce`), except while a training state is being written: that write
completes first, so a state on disk is never half of one. The run then says truthfully which state it leaves (the
last one written, or none yet). Under ``torchrun`` every rank stops at the same boundary.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from .distributed import World, any_rank

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunStopped(Exception):
    """The run stopped on a signal at a boundary; ``state_path`` holds its training state (None: not resumable).

    Args:
        signum: the signal.
        where: ``'epoch E, iteration I'``: the position the state continues from.
        state_path: the training state written there, or None for a run that cannot resume.
    """

    def __init__(self, signum: int, where: str, state_path: str | None, at_once: bool = False,
                 resumable: bool = True) -> None:
        self.signum, self.where, self.state_path = signum, where, state_path
        self.at_once, self.resumable = at_once, resumable
        name = signal.Signals(signum).name
        super().__init__(f'stopped at once by a second {name} while training' if at_once
                         else f'stopped by {name} before {where}')

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


class StoppedAtOnce(KeyboardInterrupt):
    """A second SIGINT or SIGTERM while training: the run stops where it is, not at a boundary."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Interrupted(KeyboardInterrupt):
    """A SIGINT or SIGTERM outside training (set-up, testing): the run stops where it is."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`Interrupted` (a ``KeyboardInterrupt``; main thread only), so either ends in
    one line instead of a silent kill — also where the process was started with SIGINT ignored (a background job of a
    script), where Python installs no ``KeyboardInterrupt`` of its own. On exit both signals get back the handlers
    they had."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        signal.signal(s, raise_interrupted)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_IGN if _SWALLOWING else handler)


def _swallow(signum: int, frame: object) -> None:
    """A signal that arrives while a stopped run says how it stopped: it is already stopping."""


_SWALLOWING = False


def keep_swallowing_signals() -> None:
    """For the rest of a stopped run's process: further SIGINT / SIGTERM are ignored while it exits (ignored by the
    operating system, not by a Python handler: Python restores the default handlers while it finalizes, and a late
    Ctrl-C would then kill the process with another exit status)."""
    global _SWALLOWING
    if threading.current_thread() is threading.main_thread():
        _SWALLOWING = True
        for s in SIGNALS:
            signal.signal(s, signal.SIG_IGN)


class StopRequest:
    """The signal received while training, if any (see :func:`stop_requests`)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._writing = False
        self._deferred: int | None = None

    def handle(self, signum: int, frame: object) -> None:
        if self.signum is None:
            self.signum = signum
        elif self._writing:  # a second signal while a state is written: once it is complete
            self._deferred = signum
        else:  # a second signal: stop now
            raise StoppedAtOnce(signum)

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """A training state is being written: a second signal waits until it is complete."""
        self._writing = True
        try:
            yield
        finally:
            self._writing = False
        if self._deferred is not None:
            signum, self._deferred = self._deferred, None
            raise StoppedAtOnce(signum)

    def requested(self, world: World) -> bool:
        """Whether any rank received a signal (a tiny all-reduce under torchrun, so every rank agrees)."""
        return any_rank(self.signum is not None, world)


@contextlib.contextmanager
def stop_requests() -> Iterator[StopRequest]:
    """Installs the request handlers for SIGINT and SIGTERM while training (main thread only), then the old ones."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {s: signal.signal(s, request.handle) for s in SIGNALS}
    try:
        yield request
    finally:
        # a run that is stopping swallows later signals until the command line has said how it stopped (its
        # interruptible() restores the original handlers); otherwise the previous handlers come back now
        for s, handler in previous.items():
            signal.signal(s, _swallow if request.signum is not None else handler)
