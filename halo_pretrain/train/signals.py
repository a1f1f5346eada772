"""Stop requests (SIGTERM, SIGUSR1, SIGINT) handled at a step boundary, and the trainer's exit codes.

Exit codes of halo-train (every rank exits with the same one):
    0   finished: train.steps reached, final checkpoint saved
    1   unexpected error (a traceback is printed)
    2   bad configuration or input (the message names the key or file), or run.dir in use by another trainer
    3   stopped: more than train.max_nonfinite_steps steps had a NaN/inf loss or gradient, or the weights
        became non-finite (the message names the newest checkpoint, whose weights are finite)
    4   a checkpoint could not be saved or loaded (disk full, unusable checkpoint); the previous one stays
    5   another rank was lost (died, hung, or its node went away; the message names it): this one stopped
        too, without saving; rerun the same command to resume from the newest checkpoint
    75  stopped by SIGTERM/SIGUSR1/SIGINT after saving a checkpoint: rerun the same command to resume
        (75 is EX_TEMPFAIL; a Slurm script requeues on it)
    130 a second Ctrl-C: stopped at once, nothing saved (the previous checkpoint stays)
"""

from __future__ import annotations

import os
import signal

EXIT_OK, EXIT_ERROR, EXIT_CONFIG, EXIT_NONFINITE, EXIT_CHECKPOINT, EXIT_PEER_LOST, EXIT_PREEMPTED = 0, 1, 2, 3, 4, 5, 75
EXIT_INTERRUPTED = 130
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopRequest:
    """Remembers that a stop signal arrived; the loop checks at the end of each optimizer step.
    Ctrl-C (SIGINT) stops like SIGTERM; a second Ctrl-C ends the process at once (the default action)."""

    def __init__(self, announce: bool = False):
        self.signal_name: str | None = None
        self.announce = announce  # rank 0: say at once what Ctrl-C does
        self._previous = {}

    def install(self) -> "StopRequest":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signal_name = self.signal_name or signal.Signals(signum).name
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # the next Ctrl-C is not caught: it stops at once
            if self.announce:
                os.write(2, b"\n[halo-train] Ctrl-C: saving a checkpoint after this step, then stopping "
                            b"(exit 75); press Ctrl-C again to stop at once without saving\n")

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
