"""torch.profiler over a few optimizer steps (logging.profile_steps: [first, last]).

Writes, per rank, RUN_DIR/profile/rank{R}.txt: the steps' wall time against the device's kernel time (the
gap is host overhead: Python, launches, synchronisation), then the operators by device time and by host
time; and trace_rank{R}.json for chrome://tracing or Perfetto.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile


class StepProfiler:
    def __init__(self, steps: list[int] | None, run_dir: Path, rank: int, device: torch.device):
        self.first, self.last = steps if steps else (0, -1)
        self.out_dir, self.rank, self.device = Path(run_dir) / "profile", rank, device
        self.prof, self.started = None, 0.0

    def before_step(self, step: int) -> None:
        """`step` is the number the coming optimizer step will have (1-based, as in metrics.jsonl)."""
        if step != self.first:
            return
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self.prof = profile(activities=activities)
        self.prof.__enter__()
        self._sync()
        self.started = time.perf_counter()

    def after_step(self, step: int) -> None:
        if self.prof is None or step != self.last:
            return
        self._sync()
        wall_ms = (time.perf_counter() - self.started) * 1e3
        self.prof.__exit__(None, None, None)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prof.export_chrome_trace(str(self.out_dir / f"trace_rank{self.rank}.json"))
        (self.out_dir / f"rank{self.rank}.txt").write_text(self.summary(wall_ms))
        self.prof = None

    def summary(self, wall_ms: float) -> str:
        steps = self.last - self.first + 1
        averages = self.prof.key_averages()
        lines = [f"steps {self.first}-{self.last} on {self.device}: {wall_ms / steps:.1f} ms wall per step"]
        if self.device.type == "cuda":
            kernel_ms = sum(e.device_time for e in self.prof.events()
                            if e.device_type == torch.autograd.DeviceType.CUDA) / 1e3
            lines.append(f"device kernels {kernel_ms / steps:.1f} ms per step ({100 * kernel_ms / wall_ms:.0f}% of "
                         "wall; the rest is host overhead or waiting)")
            lines += ["", "by device time:", averages.table(sort_by="self_device_time_total", row_limit=30)]
        lines += ["", "by host time:", averages.table(sort_by="self_cpu_time_total", row_limit=30)]
        return "\n".join(lines) + "\n"

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
