"""Rank-0 logging: a progress bar, metrics.jsonl (one line per optimizer step), wandb and TensorBoard."""

from __future__ import annotations

import json
import os
import resource
from pathlib import Path

import torch

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
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return len(kept)


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


class MetricsLogger:
    """Everything here is a no-op on ranks other than 0."""

    def __init__(self, run_dir: Path, is_main: bool, run_config, total_steps: int, start_step: int):
        self.is_main = is_main
        self.bar = self.wandb = self.tb = self.file = None
        if not is_main:
            return
        self.file = open(Path(run_dir) / METRICS_FILE, "a")
        log = run_config.logging
        if log.progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
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
        if self.bar is not None:
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
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.wandb is not None:
            self.wandb.log(numbers, step=record["step"])
        if self.tb is not None:
            for key, value in numbers.items():
                self.tb.add_scalar(key, value, record["step"])

    def write(self, message: str) -> None:
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.close()
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
