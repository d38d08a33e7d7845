"""Preemption: SIGTERM / SIGUSR1 / SIGUSR2 ask the trainer to stop cleanly; it exits with ``EXIT_PREEMPTED``.
SIGINT (Ctrl-C, or ``kill -INT``) does the same once training has started and exits with ``EXIT_INTERRUPTED``;
a second SIGINT exits at once (the last saved checkpoint stays intact: saves are atomic).

Cluster schedulers (SLURM, Kubernetes, spot instances) send SIGTERM, or a chosen signal such as SIGUSR1
(``sbatch --signal=USR1@120``; the submitit launcher sends SIGUSR2), some time before they kill a job. The
handler only sets a flag: the training loop checks it after each optimizer step, writes ``checkpoints/last.pt``
with its position in the epoch, and the process exits with 75 (EX_TEMPFAIL, "try again later"), so a wrapper
script can tell "preempted, requeue me" from success (0) and from a user error (2). The same command with
``trainer.resume=auto`` then continues from the exact batch where it stopped.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from typing import Iterator

EXIT_PREEMPTED = 75  # os.EX_TEMPFAIL: a temporary failure, the run can be continued
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)


class Preempted(Exception):
    """Raised by ``train`` after it saved ``last.pt`` on a stop signal; ``main`` exits with EXIT_PREEMPTED."""


class StopRequest:
    """A flag set by a stop signal. Reading it is all the training loop does: no work in the handler itself
    (a signal can arrive in the middle of a logging call or a checkpoint write)."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        # False until the training loop runs: before that there is nothing to save, and SIGINT stops at once.
        self.armed = False

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    @property
    def exit_code(self) -> int:
        return EXIT_INTERRUPTED if self.signal_name == "SIGINT" else EXIT_PREEMPTED

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT" and (not self.armed or self.signal_name is not None):
            raise KeyboardInterrupt  # before training, or a second Ctrl-C: leave now
        if self.signal_name is None:  # a second stop signal while stopping changes nothing
            self.signal_name = name
            if name == "SIGINT":
                print("\nbrain3d: Ctrl-C: stopping after this step to save checkpoints/last.pt "
                      "(press Ctrl-C again to exit at once)", file=sys.stderr, flush=True)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Within the block, SIGTERM, SIGUSR1, SIGUSR2 and (once armed) SIGINT set the yielded :class:`StopRequest`
    instead of killing the process; the previous handlers are restored on exit."""
    request = StopRequest()
    previous = {sig: signal.signal(sig, request._handle) for sig in STOP_SIGNALS}
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """DataLoader ``worker_init_fn``: a scheduler signals every process of the job, and a worker killed by
    SIGTERM would crash the main process before it can checkpoint; the main process decides when to stop."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
