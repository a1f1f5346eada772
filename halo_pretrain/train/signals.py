"""Stop requests (SIGTERM, SIGUSR1) handled at a step boundary, and the trainer's exit codes.

Exit codes of halo-train (every rank exits with the same one):
    0   finished: train.steps reached, final checkpoint saved
    1   unexpected error (a traceback is printed)
    2   bad configuration or input (the message names the key or file)
    3   stopped: more than train.max_nonfinite_steps steps had a NaN/inf loss (the last checkpoint stays)
    4   a checkpoint could not be saved or loaded (disk full, unusable checkpoint); the previous one stays
    75  stopped by SIGTERM/SIGUSR1 after saving a checkpoint: rerun the same command to resume
        (75 is EX_TEMPFAIL; a Slurm script requeues on it)
"""

from __future__ import annotations

import signal

EXIT_OK, EXIT_ERROR, EXIT_CONFIG, EXIT_NONFINITE, EXIT_CHECKPOINT, EXIT_PREEMPTED = 0, 1, 2, 3, 4, 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Remembers that a stop signal arrived; the loop checks at the end of each optimizer step."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    def install(self) -> "StopRequest":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
