"""Preemption, for both training scripts: on SIGTERM or SIGINT, finish the current step, save a checkpoint, exit 75.

Clusters and spot machines send SIGTERM some seconds before they kill a job; Ctrl-C sends SIGINT. The
handler only records the request; the loop asks `should_stop()` after each optimizer step and, when it
says so, saves a checkpoint and leaves, and the script exits 75 (EX_TEMPFAIL), which a job script can
turn into a requeue with `--resume_from latest`. A signal during the short final phase (test evaluation,
saving the outputs) lets it finish, and the run exits 0. A second signal stops at once.

With several processes the decision must be the same on every rank (a rank that saves while another
runs the next step would hang both), so the flag is all-reduced at logging intervals only, where the
loop synchronises anyway; a single process checks it after every step.
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
            self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def _handle(self, signum, frame):
        self.requested = True
        self.uninstall()  # the next signal acts as if nothing had been installed
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
