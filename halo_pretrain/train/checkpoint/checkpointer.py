"""Saving and resuming through DeepSpeed, collectively: every rank agrees on every outcome, a failure
on one rank fails the save (or skips the checkpoint) on all of them without a hang, no checkpoint is
written with non-finite weights, and nothing loaded can run code."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

import torch

from ...config import HaloConfig
from ..distributed import collective_device
from .layout import (COMPLETE, CheckpointError, Problem, ProblemKind, TrainerState, candidates, check_same_shape,
                     checksum_problem, completeness_problem, files_of, is_complete, read_latest, read_trainer_state,
                     step_of, tag_dirs, tag_for, trainer_state_problem, unpickle_problem, write_complete,
                     write_latest, write_trainer_state)
from .rng import restore_rng, save_rng
from .safe_load import weights_only_torch_load

# ds_to_universal run in a child process with every torch.load weights-only
_UNIVERSAL_CONVERTER = ("import sys; from halo_pretrain.train.checkpoint.safe_load import run_module_weights_only; "
                        "run_module_weights_only('deepspeed.checkpoint.ds_to_universal', sys.argv[1:])")


class NonFiniteWeightsError(CheckpointError):
    """The weights hold NaN or inf: the checkpoint is not written (the trainer stops with exit 3)."""


def gather_objects(value) -> list:
    """Every rank's value, in rank order (a one-element list without a process group)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _attempt(action: Callable[[], object]) -> str | None:
    """None when `action` ran, else what went wrong (it is reported once every rank knows)."""
    try:
        action()
    except Exception as e:  # a full disk reaches torch.save as a RuntimeError, a bad directory as an OSError
        return f"{type(e).__name__}: {e}"
    return None


def weights_are_finite(engine) -> bool:
    """Collective: every weight finite on every rank. Each rank checks what it holds: its ZeRO-3
    partition, or every world_size-th tensor of the whole model (ZeRO 0-2)."""
    import torch.distributed as dist

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    params = list(engine.module.parameters())
    held = [p.ds_tensor for p in params] if engine.zero_optimization_stage() == 3 else params[rank::world]
    total = torch.zeros((), dtype=torch.float32, device=collective_device())
    for t in held:  # a NaN or inf anywhere makes the sum non-finite (finite weights never sum past 3e38)
        total += torch.sum(t.detach(), dtype=torch.float32).to(total.device)
    if dist.is_initialized():
        dist.all_reduce(total)
    return bool(torch.isfinite(total))


class _RecordingCheckpointEngine:
    """DeepSpeed's checkpoint engine whose write failures are recorded instead of raised: a rank whose
    disk is full then goes on through DeepSpeed's barriers with the others, and Checkpointer.save fails
    on every rank together afterwards (an exception inside save_checkpoint would leave the other ranks
    waiting in its barriers)."""

    def __init__(self, inner):
        self.inner, self.error, self.injected = inner, None, None

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def record(self, write: Callable, *args, **kwargs):
        if self.error is not None:  # one failed write spoils the checkpoint: skip the rest
            return None
        try:
            if self.injected is not None:
                raise self.injected
            return write(*args, **kwargs)
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"
            return None

    def save(self, state_dict, path: str):
        return self.record(self.inner.save, state_dict, path)

    def makedirs(self, path, exist_ok=False):
        return self.record(self.inner.makedirs, path, exist_ok=exist_ok)

    def take_error(self) -> str | None:
        error, self.error, self.injected = self.error, None, None
        return error


class Checkpointer:
    """Checkpoints of one run in `ckpt_dir` (layout: layout.py). kill_during_save_step and fail_save
    ([step, rank]: that rank's DeepSpeed files fail to write) are fault injections for the tests."""

    def __init__(self, ckpt_dir: Path, rank: int, world_size: int, keep_last: int,
                 say: Callable[[str], None] = print, kill_during_save_step: int | None = None,
                 fail_save: tuple[int, int] | None = None):
        self.dir, self.rank, self.world_size, self.keep_last = Path(ckpt_dir), rank, world_size, keep_last
        self.say = say
        self.kill_during_save_step, self.fail_save = kill_during_save_step, tuple(fail_save or ()) or None
        self.last_good: Path | None = None  # the newest checkpoint this run saved or resumed: its weights are finite

    # ---- save ------------------------------------------------------------------------------------

    def _recorder(self, engine) -> _RecordingCheckpointEngine:
        if not isinstance(engine.checkpoint_engine, _RecordingCheckpointEngine):
            recorder = _RecordingCheckpointEngine(engine.checkpoint_engine)
            engine.checkpoint_engine = recorder
            copy_scripts = engine._copy_recovery_script  # zero_to_fp32.py, copied by rank 0 outside the engine
            engine._copy_recovery_script = lambda save_path: recorder.record(copy_scripts, save_path)
        return engine.checkpoint_engine

    def _agree(self, tag_dir: Path, error: str | None) -> None:
        """Collective: raise on every rank when the save failed on any, naming each failure."""
        failed = [(r, e) for r, e in enumerate(gather_objects(error)) if e is not None]
        if not failed:
            return
        try:
            free = f"{shutil.disk_usage(self.dir).free / 2**20:.1f} MiB"
        except OSError:
            free = "unknown space"
        if self.rank == 0:
            shutil.rmtree(tag_dir, ignore_errors=True)
        previous = read_latest(self.dir)
        causes = "; ".join(f"rank {r}: {e}" for r, e in failed)
        raise CheckpointError(
            f"saving checkpoint {tag_dir} failed ({free} were free there) on {causes}. The previous complete "
            f"checkpoint ({previous or 'none'}) is intact; free space (or fix the directory) and rerun to resume")

    def save(self, engine, state: TrainerState) -> Path:
        """Collective. Refuses non-finite weights (NonFiniteWeightsError, nothing written). A failure on
        any rank (disk full, ...) fails the save on every rank: the partial directory is removed and
        `latest` still names the previous complete checkpoint."""
        tag = tag_for(state.step)
        tag_dir = self.dir / tag
        if not weights_are_finite(engine):
            raise NonFiniteWeightsError(f"the weights after step {state.step} are not finite (NaN or inf): "
                                        f"checkpoint {tag} not written")
        recorder = self._recorder(engine)

        def clear():
            self.dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tag_dir, ignore_errors=True)  # a leftover of a save that was cut short

        self._agree(tag_dir, _attempt(clear) if self.rank == 0 else None)
        if self.fail_save == (state.step, self.rank):
            recorder.injected = OSError(errno.ENOSPC, "No space left on device (debug.fail_save)")
        engine.save_checkpoint(str(self.dir), tag=tag, save_latest=False)

        def ours():
            save_rng(tag_dir, self.rank)
            if self.kill_during_save_step == state.step:  # tests: die in the middle of a save
                os.kill(os.getpid(), signal.SIGKILL)
            if self.rank == 0:
                write_trainer_state(tag_dir, state)

        error = recorder.take_error()
        self._agree(tag_dir, error or _attempt(ours))
        names = files_of(tag_dir)  # every rank's files are there: the agreement above was a barrier
        sums: dict[str, str] = {}

        def hash_share():  # each rank syncs and hashes a share of the files
            from ...fileio import fsync_file, sha256_file

            for rel in names[self.rank::self.world_size]:
                fsync_file(tag_dir / rel)
                sums[rel] = sha256_file(tag_dir / rel)

        error = _attempt(hash_share)
        parts = gather_objects(sums)
        self._agree(tag_dir, error)
        sums = {k: v for part in parts for k, v in part.items()}

        def mark_complete():
            write_complete(tag_dir, state.step, sums)
            write_latest(self.dir, tag)

        self._agree(tag_dir, _attempt(mark_complete) if self.rank == 0 else None)
        self.last_good = tag_dir
        if self.rank == 0:
            self.prune(keep=tag)
        return tag_dir

    def prune(self, keep: str) -> None:
        """Keep `keep` and the complete checkpoints before it, keep_last in all; remove the rest: older
        ones, incomplete leftovers, and any of a later step (an abandoned future after a fallback)."""
        keep_step = step_of(keep)
        kept = 0
        for step, path in tag_dirs(self.dir):
            if path.name == keep or (step < keep_step and kept < self.keep_last and is_complete(path)):
                kept += 1
                continue
            shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(self.dir / "universal", ignore_errors=True)  # conversions for a resume, no longer needed

    # ---- resume ----------------------------------------------------------------------------------

    def newest_state(self) -> tuple[Path, TrainerState] | None:
        """The trainer state of the checkpoint a resume would try first (before any engine exists)."""
        for tag_dir in candidates(self.dir):
            if is_complete(tag_dir) and trainer_state_problem(tag_dir) is None:
                return tag_dir, read_trainer_state(tag_dir)
        return None

    def reshard_from(self, zero_stage: int, precision: str) -> TrainerState | None:
        """The state of the checkpoint to resume when it was written with another world size or ZeRO stage
        and its optimizer state is partitioned (it then loads through DeepSpeed's universal format)."""
        newest = self.newest_state()
        if newest is None:
            return None
        state = newest[1]
        plain = state.zero_stage == zero_stage == 0 and precision == "fp32"
        changed = state.world_size != self.world_size or state.zero_stage != zero_stage
        return state if changed and not plain else None

    def _first(self, problems: list[Problem | None]) -> Problem | None:
        found = [p for p in problems if p is not None]
        return found[0] if found else None

    def _verify(self, tag_dir: Path) -> Problem | None:
        """Collective: the checkpoint is complete, intact (checksums), holds nothing but tensors and plain
        data (the files shared out over the ranks) and a readable trainer state; the same answer on every
        rank, even where one rank sees the directory differently."""
        mine = completeness_problem(tag_dir)
        if mine is None:
            mine = checksum_problem(tag_dir, self.rank, self.world_size) or \
                unpickle_problem(tag_dir, self.rank, self.world_size) or trainer_state_problem(tag_dir)
        return self._first(gather_objects(mine))

    def _to_universal(self, tag_dir: Path) -> tuple[Path, str | None]:
        """Convert a checkpoint to DeepSpeed's universal format once (rank 0, weights-only loads),
        under <dir>/universal/. Collective: (its parent directory, what failed or None)."""
        out = self.dir / "universal" / tag_dir.name
        error = None
        if self.rank == 0 and not (out / COMPLETE).is_file():
            tmp = out.with_name(out.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
            self.say(f"{tag_dir.name} was written with another world size or ZeRO stage: converting it to "
                     f"DeepSpeed's universal format in {out}")
            proc = subprocess.run([sys.executable, "-c", _UNIVERSAL_CONVERTER, "--input_folder", str(tag_dir),
                                   "--output_folder", str(tmp), "--num_extract_workers", "1",
                                   "--num_merge_workers", "1", "--inject_missing_state"],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                error = f"converting it to a universal checkpoint failed: {proc.stderr.strip()[-3000:]}"
            else:
                (tmp / COMPLETE).write_text("{}")
                os.replace(tmp, out)
        return out.parent, self._first(gather_objects(error))

    def _load(self, engine, tag_dir: Path, universal: bool) -> Problem | None:
        """Collective: DeepSpeed loads the checkpoint, every torch.load weights-only; then its weights
        must be finite. The same answer on every rank."""
        load_dir, error = self._to_universal(tag_dir) if universal else (self.dir, None)
        if error is None:
            try:
                groups = _param_groups_of(engine)
                with weights_only_torch_load():
                    path, _ = engine.load_checkpoint(str(load_dir), tag=tag_dir.name, load_optimizer_states=True,
                                                     load_lr_scheduler_states=False)
                if universal:
                    _restore_param_groups(engine, groups)
                if path is None:
                    error = "DeepSpeed found no loadable files"
            except Exception as e:  # damaged or refused files raise anything from pickle, zipfile, torch
                error = f"{type(e).__name__}: {e}"
        failed = [(r, e) for r, e in enumerate(gather_objects(error)) if e is not None]
        if failed:
            return Problem(ProblemKind.LOAD_FAILED, None, "; ".join(f"rank {r}: {e}" for r, e in failed))
        if not weights_are_finite(engine):
            return Problem(ProblemKind.NONFINITE_WEIGHTS, None, "NaN or inf")
        return None

    def resume(self, engine, model_config: HaloConfig, universal: bool = False) -> TrainerState | None:
        """Load the newest usable checkpoint (collective); None when there is none to load.
        universal: the engine was built with checkpoint.load_universal (see reshard_from)."""
        tried: list[tuple[Path, Problem]] = []
        for tag_dir in candidates(self.dir):
            problem = self._verify(tag_dir)
            if problem is None:
                state = read_trainer_state(tag_dir)
                check_same_shape(tag_dir, state.model, model_config)
                problem = self._load(engine, tag_dir, universal)
            if problem is not None:
                tried.append((tag_dir, problem))
                if not problem.expected:
                    self.say(f"checkpoint {tag_dir} is unusable: {problem}; falling back to the previous complete one")
                continue
            restore_rng(tag_dir, self.rank, self.world_size, state.world_size, state.run_config.get("seed", 0),
                        state.step, self.say)
            self.last_good = tag_dir
            return state
        if any(not p.expected for _, p in tried):
            listed = "; ".join(f"{d.name}: {p}" for d, p in tried)
            raise CheckpointError(f"no usable checkpoint in {self.dir} ({listed}); move the directory away to "
                                  "start from scratch")
        return None


def _param_groups_of(engine) -> list[dict]:
    return [dict(g) for g in engine.optimizer.param_groups]


def _restore_param_groups(engine, saved: list[dict]) -> None:
    """DeepSpeed 0.19's ZeRO-3 universal load empties every group's params and copies group 0's
    hyperparameters (weight decay) to all groups; put back our groups' own (moments and step are
    loaded correctly, keyed by the same flat tensors)."""
    for group, before in zip(engine.optimizer.param_groups, saved):
        if not group["params"]:
            group["params"] = before["params"]
        group["weight_decay"] = before["weight_decay"]
