"""Rank-0 logging: metrics.jsonl (one line per optimizer step), the console (a progress bar on a terminal,
plain lines in a log file), wandb and TensorBoard."""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

from ..fileio import write_atomic

# dense bf16 tensor-core peak per device, FLOP/s, for MFU when train.peak_tflops is not set
KNOWN_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "A10G": 125e12,
                    "L40S": 362e12, "4090": 165e12}
METRICS_FILE = "metrics.jsonl"


def check_logging_packages(run_config) -> None:
    """wandb and TensorBoard are optional: a clear error at start when one is asked for but missing."""
    import importlib.util

    from .run_config import ConfigError

    log = run_config.logging
    wanted = [("wandb", "logging.wandb_project", bool(log.wandb_project) and wandb_mode(log) != "disabled"),
              ("tensorboard", "logging.tensorboard", log.tensorboard)]
    for package, key, asked in wanted:
        if asked and importlib.util.find_spec(package) is None:
            raise ConfigError(f"{key} is set but the '{package}' package is not installed: pip install {package}, "
                              f"or unset {key}")


WANDB_MODE_ALIASES = {"dryrun": "offline", "run": "online"}  # wandb's older names


def wandb_mode(log, env=os.environ) -> str:
    """logging.wandb_mode; left unset, $WANDB_MODE; else online."""
    mode = log.wandb_mode or env.get("WANDB_MODE") or "online"
    return WANDB_MODE_ALIASES.get(mode, mode)


def start_wandb(run_config, run_dir: Path, mode: str, say=print):
    """wandb.init; when online logging cannot start (no API key, no network) it logs offline instead,
    saying how to upload later: a logging problem never stops a training run."""
    import wandb

    log = run_config.logging
    kwargs = dict(project=log.wandb_project, entity=log.wandb_entity, name=run_config.run.name, dir=str(run_dir),
                  resume="allow", id=_wandb_id(run_dir), config=run_config.model_dump(mode="json"))
    try:
        return wandb.init(mode=mode, **kwargs)
    except Exception as e:  # wandb.errors.UsageError without an API key, CommError without a network, ...
        if mode != "online":
            raise
        where = Path(run_dir) / "wandb"
        say(f"[halo-train] wandb could not log online ({type(e).__name__}: {e}); logging offline to {where} "
            f"instead: upload it later with `wandb sync {where}/offline-run-*` (`wandb login` or WANDB_API_KEY "
            "for online logging)")
        return wandb.init(mode="offline", **kwargs)


def peak_flops(configured_tflops: float | None) -> float | None:
    if configured_tflops:
        return configured_tflops * 1e12
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, flops in KNOWN_PEAK_FLOPS.items():
            if key in name:
                return flops
    return None


def memory_gb() -> float:
    """Peak device memory on CUDA, else the process's peak resident memory."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def truncate_metrics(run_dir: Path, last_step: int) -> int:
    """Drop lines of steps after `last_step` (written before a crash, redone after resume) and any torn line."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return 0
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    write_atomic(path, "".join(line + "\n" for line in kept))
    return len(kept)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of metrics.jsonl. Only lines that end in a newline count: a live trainer may be
    halfway through writing the last one."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    complete = path.read_text().rpartition("\n")[0]
    return [json.loads(line) for line in complete.splitlines() if line.strip()]


def format_duration(seconds: float) -> str:
    """3h05m, 4m07s, 12s."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Console:
    """What a person or a log file sees. On a terminal with logging.progress_bar, a tqdm bar; otherwise
    (Slurm, nohup, a pipe, or progress_bar=false) one plain line every `interval` steps with the means over
    those steps. Validation results and a closing summary are printed either way."""

    PREFIX = "[halo-train] "

    def __init__(self, total_steps: int, start_step: int, interval: int, progress_bar: bool, stream=None,
                 clock=time.monotonic):
        self.stream = stream if stream is not None else sys.stdout
        self.total, self.start_step, self.interval, self.clock = total_steps, start_step, interval, clock
        self.bar = None
        if progress_bar and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                            file=self.stream)
        self.started = clock()
        self.window: list[dict] = []  # records since the last plain line
        self.first: tuple[float, int] | None = None  # (time, step) after this run's first step: the ETA's origin
        self.last: dict | None = None
        self.tokens = 0
        self.train_seconds = 0.0
        self.best_val: tuple[float, int] | None = None
        self.last_val: tuple[float, int] | None = None

    def write(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def eta(self, step: int) -> float | None:
        now = self.clock()
        if self.first is None or step <= self.first[1]:
            return None
        per_step = (now - self.first[0]) / (step - self.first[1])  # evaluations and checkpoints included
        return per_step * (self.total - step)

    def log(self, record: dict) -> None:
        step = record["step"]
        if self.first is None:
            self.first = (self.clock(), step)
        self.tokens += record["tokens_per_s"] * record["step_time"]  # the step's tokens
        self.train_seconds += record["step_time"]
        self.last = record
        self.window.append(record)
        if self.bar is not None:
            self._update_bar(record)
        elif step % self.interval == 0 or step == self.total:
            self.write(self.PREFIX + self.plain_line(self.window, step))
            self.window = []
        if record.get("val_loss") is not None:
            self.last_val = (record["val_loss"], step)
            if self.best_val is None or record["val_loss"] < self.best_val[0]:
                self.best_val = self.last_val
            self.write(f"{self.PREFIX}step {step}/{self.total} validation: loss {record['val_loss']:.4f}, "
                       f"ppl {record['val_ppl']:.2f}")

    def plain_line(self, window: list[dict], step: int) -> str:
        """step, mean loss, lr, mean grad norm, tokens/s and MFU over the window's steps, memory, ETA."""
        losses = [r["loss"] for r in window if r["loss"] is not None]
        norms = [r["grad_norm"] for r in window if r.get("grad_norm") is not None]
        seconds = sum(r["step_time"] for r in window)
        tokens = sum(r["tokens_per_s"] * r["step_time"] for r in window)
        parts = [f"step {step}/{self.total}",
                 f"loss {sum(losses) / len(losses):.4f}" if losses else "loss -",
                 f"lr {window[-1]['lr']:.2e}"]
        if norms:
            parts.append(f"gnorm {sum(norms) / len(norms):.3f}")
        parts.append(f"{tokens / seconds:,.0f} tok/s" if seconds > 0 else "- tok/s")
        mfus = [(r["mfu"], r["step_time"]) for r in window if r.get("mfu") is not None]
        parts.append(f"mfu {100 * sum(m * t for m, t in mfus) / seconds:.1f}%" if mfus and seconds > 0 else "mfu -")
        parts.append(f"mem {window[-1]['mem_gb']:.1f}G")
        skipped = len(window) - len(losses)
        if skipped:
            parts.append(f"{skipped} skipped")
        eta = self.eta(step)
        parts.append(f"eta {format_duration(eta)}" if eta is not None else "eta -")
        return " | ".join(parts)

    def _update_bar(self, record: dict) -> None:
        loss = record["loss"]
        show = {"loss": "skipped" if loss is None else f"{loss:.4f}", "lr": f"{record['lr']:.2e}"}
        if record.get("grad_norm") is not None:
            show["gnorm"] = f"{record['grad_norm']:.3f}"
        show["tok/s"] = f"{record['tokens_per_s']:.0f}"
        if record.get("mfu") is not None:
            show["mfu"] = f"{100 * record['mfu']:.1f}%"
        show["mem"] = f"{record['mem_gb']:.1f}G"
        self.bar.set_postfix(show, refresh=False)
        self.bar.update(record["step"] - self.bar.n)

    def summary(self) -> str | None:
        """This invocation in one line, or None when it ran no step."""
        if self.last is None:
            return None
        r = self.last
        wall = self.clock() - self.started
        parts = [f"ran steps {self.start_step + 1}-{r['step']} of {self.total} in {format_duration(wall)}",
                 f"{self.tokens:,.0f} tokens at {self.tokens / max(self.train_seconds, 1e-9):,.0f} tok/s"]
        if r["loss"] is not None:
            parts.append(f"last loss {r['loss']:.4f}")
        if self.last_val is not None:
            val = f"validation loss {self.last_val[0]:.4f} at step {self.last_val[1]}"
            if self.best_val != self.last_val:
                val += f" (best {self.best_val[0]:.4f} at step {self.best_val[1]})"
            parts.append(val)
        parts.append(f"peak memory {r['mem_gb']:.1f}G")
        return self.PREFIX + "summary: " + "; ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        line = self.summary()
        if line is not None:
            self.write(line)


class MetricsLogger:
    """metrics.jsonl, wandb, TensorBoard and the console (Console). A no-op on ranks other than 0."""

    def __init__(self, run_dir: Path, is_main: bool, run_config, total_steps: int, start_step: int,
                 stream=None):
        self.is_main = is_main
        self.console = self.wandb = self.tb = self.file = None
        if not is_main:
            return
        self.file = open(Path(run_dir) / METRICS_FILE, "a")
        log = run_config.logging
        self.console = Console(total_steps, start_step, log.log_interval, log.progress_bar, stream)
        if log.wandb_project and wandb_mode(log) != "disabled":
            self.wandb = start_wandb(run_config, run_dir, wandb_mode(log))
        if log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def log(self, record: dict) -> None:
        if not self.is_main:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self.console.log(record)
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.wandb is not None:
            self.wandb.log(numbers, step=record["step"])
        if self.tb is not None:
            for key, value in numbers.items():
                self.tb.add_scalar(key, value, record["step"])

    def write(self, message: str) -> None:
        if self.is_main:
            self.console.write(message)

    def close(self) -> None:
        if not self.is_main:
            return
        self.console.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.tb is not None:
            self.tb.close()
        self.file.close()


def _wandb_id(run_dir: Path) -> str:
    """One wandb run per run directory, so a resumed run continues the same curve."""
    path = Path(run_dir) / "wandb_id"
    if not path.is_file():
        import uuid

        path.write_text(uuid.uuid4().hex[:12])
    return path.read_text().strip()
