"""Preemption, for both training scripts: on SIGTERM or SIGINT, finish the current step, save a checkpoint, exit 75.

The handler stays installed after the training loop: a signal during the short final phase (test
evaluation, saving the outputs) lets that phase finish, and the run exits 0 as if uninterrupted. (A
hard kill there loses nothing either: resuming from the last checkpoint skips the finished training
and redoes only the final phase.)

Clusters and spot machines send SIGTERM some seconds before they kill a job; Ctrl-C sends SIGINT.
The handler only records the request. The loop asks `should_stop()` after each optimizer step and,
when it says so, saves a checkpoint and leaves; the script then exits with `EXIT_PREEMPTED` (75,
EX_TEMPFAIL: "try again later"), which a job script can turn into a requeue with
`--resume_from latest`. A second signal gets the default behaviour back: a second Ctrl-C stops at once.

With several processes the decision must be the same on every rank: a rank that starts saving while
another runs the next step would hang both. So the flag is all-reduced, at logging intervals only
(where the loop synchronises anyway), which keeps the training step free of host syncs. A single
process checks it after every step.
"""

import signal
import sys
import threading

import torch

EXIT_PREEMPTED = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preemption:
    def __init__(self):
        self.requested = False
        self._previous = {}

    def install(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum, frame):
        self.requested = True
        self.uninstall()  # the next signal acts as if we had never installed anything
        print(f"received {signal.Signals(signum).name}: finishing this step, then saving a checkpoint (or, after "
              f"training, finishing the final evaluation and outputs); send it again to stop at once",
              file=sys.stderr, flush=True)

    def should_stop(self, accelerator, at_sync_point: bool) -> bool:
        """True on every process when any process was signalled (checked at `at_sync_point` steps if distributed)."""
        if accelerator.num_processes == 1:
            return self.requested
        if not at_sync_point:
            return False
        flag = torch.tensor(float(self.requested), device=accelerator.device)
        return accelerator.reduce(flag, "sum").item() > 0
