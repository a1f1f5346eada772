"""Checkpoints that count only when complete, and resume from the newest complete one.

Layout under the checkpoint directory (default <run.dir>/checkpoints):

    step_00000100/            one checkpoint: DeepSpeed's files (any ZeRO stage) plus
        trainer_state.json    step, consumed samples, tokens, skipped steps, world size, ZeRO stage,
                              the model config and the run config
        rng/rank_00000.json   every RNG state of each rank (python, numpy, torch, cuda)
        complete.json         written last: every file of the checkpoint with its size and SHA-256
    latest                    the tag of the newest complete checkpoint, replaced atomically

A crash at any moment leaves `latest` naming a complete checkpoint. On start the run loads the
checkpoint `latest` names; if its files are missing, truncated, changed (checksum) or unreadable it
says so and falls back to the previous complete one. Checksums are computed and verified with the
files shared out over the ranks.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import contextlib
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..config import HaloConfig
from .distributed import collective_device

TAG_RE = re.compile(r"^step_(\d{8,})$")
COMPLETE, LATEST, TRAINER_STATE = "complete.json", "latest", "trainer_state.json"
SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "num_globals",
                "use_swiglu", "intermediate_size", "norm", "tie_embeddings")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says which and what to do."""


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done (skipped ones included)
    consumed_samples: int = 0
    tokens: int = 0
    nonfinite_steps: int = 0
    world_size: int = 1
    zero_stage: int = 0
    model: dict = field(default_factory=dict)
    run_config: dict = field(default_factory=dict)


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def tag_dirs(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Every step_* directory, newest first, complete or not."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if p.is_dir() and (m := TAG_RE.match(p.name))]
    return sorted(found, reverse=True)


def incomplete_reason(tag_dir: Path) -> str | None:
    """None when the checkpoint is complete, else why not."""
    marker = tag_dir / COMPLETE
    if not marker.is_file():
        return f"no {COMPLETE} (the save did not finish)"
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        return f"{COMPLETE} is unreadable ({e})"
    for rel, size in files.items():
        path = tag_dir / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != size:
            return f"{rel} is truncated or changed ({path.stat().st_size} bytes, {size} expected)"
    return None


def sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def checksum_mismatch(tag_dir: Path, rank: int = 0, world_size: int = 1) -> str | None:
    """Verify this rank's share (every world_size-th file) of the checksums in complete.json."""
    sums = json.loads((tag_dir / COMPLETE).read_text()).get("sha256", {})
    for rel in sorted(sums)[rank::world_size]:
        if sha256_of(tag_dir / rel) != sums[rel]:
            return f"{rel} does not match its checksum (corrupted)"
    return None


def _gather(value):
    """Every rank's value, in rank order (a one-element list without a process group)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def read_latest(ckpt_dir: Path) -> str | None:
    try:
        return (ckpt_dir / LATEST).read_text().strip() or None
    except OSError:
        return None


def candidates(ckpt_dir: Path) -> list[Path]:
    """Checkpoints to try, best first: the one `latest` names, then the others newest first."""
    tags = [p for _, p in tag_dirs(ckpt_dir)]
    latest = read_latest(ckpt_dir)
    first = [p for p in tags if p.name == latest]
    return first + [p for p in tags if p.name != latest]


def read_trainer_state(tag_dir: Path) -> TrainerState:
    return TrainerState(**json.loads((tag_dir / TRAINER_STATE).read_text()))


def check_same_shape(tag_dir: Path, saved: dict, current: HaloConfig) -> None:
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, this run {getattr(current, k)!r}"
             for k in SHAPE_FIELDS if saved.get(k) != getattr(current, k)]
    if diffs:
        raise CheckpointError(
            f"{tag_dir} was written by a model of a different shape ({'; '.join(diffs)}); resume with the "
            "model.* keys it was trained with, or use a new run.dir / checkpoint.dir to start a new run")


# ---- RNG ------------------------------------------------------------------------------------------


def rng_state() -> dict:
    state = {
        "python": repr(random.getstate()),
        "numpy": [np.random.get_state()[0], np.random.get_state()[1].tolist(), *np.random.get_state()[2:]],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    import ast

    random.setstate(ast.literal_eval(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---- save / resume --------------------------------------------------------------------------------


class Checkpointer:
    def __init__(self, ckpt_dir: Path, rank: int, world_size: int, keep_last: int,
                 say: Callable[[str], None] = print):
        self.dir, self.rank, self.world_size, self.keep_last, self.say = Path(ckpt_dir), rank, world_size, keep_last, say

    def _barrier(self):
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()

    def save(self, engine, state: TrainerState, kill_at_step: int | None = None) -> Path:
        """Collective. On an error (disk full, ...) the partial directory is removed, `latest` is untouched,
        and the error is raised on the rank that hit it."""
        tag = tag_for(state.step)
        tag_dir = self.dir / tag
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            if tag_dir.exists():  # a leftover of a save that was cut short
                shutil.rmtree(tag_dir)
        self._barrier()
        try:
            engine.save_checkpoint(str(self.dir), tag=tag, save_latest=False)
            (tag_dir / "rng").mkdir(parents=True, exist_ok=True)
            _fsync_write(tag_dir / "rng" / f"rank_{self.rank:05d}.json", json.dumps(rng_state()))
            if kill_at_step == state.step:  # tests: die in the middle of a save
                os.kill(os.getpid(), signal.SIGKILL)
            if self.rank == 0:
                _fsync_write(tag_dir / TRAINER_STATE, json.dumps(asdict(state), indent=1))
            self._barrier()
            names = sorted(str(p.relative_to(tag_dir)) for p in tag_dir.rglob("*") if p.is_file())
            mine = {}
            for rel in names[self.rank::self.world_size]:  # each rank syncs and hashes a share of the files
                _fsync_file(tag_dir / rel)
                mine[rel] = sha256_of(tag_dir / rel)
            sums = {k: v for part in _gather(mine) for k, v in part.items()}
            if self.rank == 0:
                files = {rel: (tag_dir / rel).stat().st_size for rel in names}
                _fsync_write(tag_dir / COMPLETE, json.dumps({"step": state.step, "files": files, "sha256": sums},
                                                            indent=1))
                _fsync_write(self.dir / LATEST, tag + "\n")
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
            free = shutil.disk_usage(self.dir).free / 2**20
            if self.rank == 0 or tag_dir.exists():
                shutil.rmtree(tag_dir, ignore_errors=True)
            previous = read_latest(self.dir)
            raise CheckpointError(
                f"saving checkpoint {tag_dir} failed ({free:.1f} MiB were free there): {e}. The previous complete checkpoint "
                f"({previous or 'none'}) is intact; free space (or fix the directory) and rerun to resume") from e
        self._barrier()
        if self.rank == 0:
            self.prune(keep=tag)
        return tag_dir

    def prune(self, keep: str) -> None:
        """Keep `keep` and the complete checkpoints before it, keep_last in all; remove the rest: older
        ones, incomplete leftovers, and any of a later step (an abandoned future after a fallback)."""
        keep_step = int(TAG_RE.match(keep).group(1))
        kept = 0
        for step, path in tag_dirs(self.dir):
            if path.name == keep or (step < keep_step and kept < self.keep_last and incomplete_reason(path) is None):
                kept += 1
                continue
            shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(self.dir / "universal", ignore_errors=True)  # conversions for a resume, no longer needed

    def newest_state(self) -> tuple[Path, TrainerState] | None:
        """The trainer state of the checkpoint a resume would try first (before any engine exists)."""
        for tag_dir in candidates(self.dir):
            if incomplete_reason(tag_dir) is None:
                try:
                    return tag_dir, read_trainer_state(tag_dir)
                except (OSError, ValueError, TypeError):
                    continue
        return None

    def reshard_from(self, zero_stage: int, precision: str) -> TrainerState | None:
        """The state of the checkpoint to resume when it was written with another world size or ZeRO stage
        and its optimizer state is partitioned (it then loads through DeepSpeed's universal format)."""
        for tag_dir in candidates(self.dir):
            if incomplete_reason(tag_dir) is None:
                try:
                    state = read_trainer_state(tag_dir)
                except (OSError, ValueError, TypeError):
                    continue
                plain = state.zero_stage == zero_stage == 0 and precision == "fp32"
                changed = state.world_size != self.world_size or state.zero_stage != zero_stage
                return state if changed and not plain else None
        return None

    def _to_universal(self, tag_dir: Path) -> Path:
        """Convert a checkpoint to DeepSpeed's universal format once (rank 0), under <dir>/universal/."""
        import subprocess
        import sys

        out = self.dir / "universal" / tag_dir.name
        if self.rank == 0 and not (out / COMPLETE).is_file():
            tmp = out.with_name(out.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
            self.say(f"{tag_dir.name} was written with another world size or ZeRO stage: converting it to "
                     f"DeepSpeed's universal format in {out}")
            proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                                   str(tag_dir), "--output_folder", str(tmp), "--num_extract_workers", "1",
                                   "--num_merge_workers", "1", "--inject_missing_state"],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise CheckpointError(f"converting {tag_dir} to a universal checkpoint failed:\n{proc.stderr[-3000:]}")
            (tmp / COMPLETE).write_text("{}")
            os.replace(tmp, out)
        self._barrier()
        return out

    def resume(self, engine, model_config: HaloConfig, universal: bool = False) -> TrainerState | None:
        """Load the newest usable checkpoint (collective); None when there is none to load.
        universal: the engine was built with checkpoint.load_universal (see reshard_from)."""
        import torch.distributed as dist

        tried = []
        for tag_dir in candidates(self.dir):
            reason = incomplete_reason(tag_dir)  # the same answer on every rank (a shared directory)
            if reason is None:
                found = [r for r in _gather(checksum_mismatch(tag_dir, self.rank, self.world_size)) if r]
                reason = found[0] if found else None
            if reason is None:
                try:
                    state = read_trainer_state(tag_dir)
                except (OSError, ValueError, TypeError) as e:
                    reason = f"{TRAINER_STATE} is unreadable ({e})"
            if reason is not None:
                tried.append(f"{tag_dir.name}: {reason}")
                if reason.startswith("no "):  # a save cut short is expected, not news
                    continue
                self.say(f"checkpoint {tag_dir} is unusable: {reason}; falling back to the previous complete one")
                continue
            check_same_shape(tag_dir, state.model, model_config)
            error = None
            try:
                load_dir = self._to_universal(tag_dir).parent if universal else self.dir
                groups = _param_groups_of(engine)
                path, _ = engine.load_checkpoint(str(load_dir), tag=tag_dir.name, load_optimizer_states=True,
                                                 load_lr_scheduler_states=False)
                if universal:
                    _restore_param_groups(engine, groups)
                if path is None:
                    error = "DeepSpeed found no loadable files"
            except Exception as e:  # corrupt files raise anything from pickle, zipfile, torch
                error = f"{type(e).__name__}: {e}"
            ok = torch.tensor([0 if error else 1], device=collective_device())
            if dist.is_initialized():
                dist.all_reduce(ok, op=dist.ReduceOp.MIN)
            if int(ok) == 0:
                error = error or "another rank could not load its part"
                tried.append(f"{tag_dir.name}: {error}")
                self.say(f"checkpoint {tag_dir} failed to load ({error}); falling back to the previous complete one")
                continue
            self._restore_rng(tag_dir, state)
            return state
        if tried:
            complete_seen = any(not t.split(": ", 1)[1].startswith("no ") for t in tried)
            if complete_seen:
                raise CheckpointError(f"no usable checkpoint in {self.dir} ({'; '.join(tried)}); move the directory "
                                      "away to start from scratch")
        return None

    def _restore_rng(self, tag_dir: Path, state: TrainerState) -> None:
        path = tag_dir / "rng" / f"rank_{self.rank:05d}.json"
        if state.world_size == self.world_size and path.is_file():
            set_rng_state(json.loads(path.read_text()))
        else:
            seed_all(hash((state.run_config.get("seed", 0), self.rank, state.step)) % 2**31)
            if self.rank == 0:
                self.say(f"world size changed ({state.world_size} -> {self.world_size}): random states reseeded")


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


# ---- consolidated weights for export --------------------------------------------------------------


def checkpoint_dir_of(run_dir: Path) -> Path:
    config = run_dir / "config.yaml"
    if config.is_file():
        import yaml

        saved = (yaml.safe_load(config.read_text()) or {}).get("checkpoint", {}).get("dir")
        if saved:
            return Path(saved)
    return run_dir / "checkpoints"


def find_checkpoint(run_dir: str | Path, step: int | None = None) -> Path:
    """The complete checkpoint of `step`, or the newest complete one; a clear error listing what exists."""
    run_dir = Path(run_dir)
    ckpt_dir = checkpoint_dir_of(run_dir)
    complete = [(s, p) for s, p in tag_dirs(ckpt_dir) if incomplete_reason(p) is None]
    steps = ", ".join(str(s) for s, _ in sorted(complete)) or "none"
    chosen = [p for p in candidates(ckpt_dir) if incomplete_reason(p) is None] if step is None else \
        [p for s, p in complete if s == step]
    for p in chosen:
        bad = checksum_mismatch(p)
        if bad is None:
            return p
        if step is not None:
            raise CheckpointError(f"{p}: {bad}; complete steps: {steps}")
        warnings.warn(f"{p}: {bad}; using the previous complete checkpoint")
    if step is None:
        raise CheckpointError(f"{run_dir}: no complete checkpoint in {ckpt_dir}")
    raise CheckpointError(f"{run_dir}: no complete checkpoint of step {step}; complete steps: {steps}")


def deepspeed_safe_globals() -> list:
    """The plain-data classes DeepSpeed stores in its checkpoints, allowed when unpickling weights-only."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


@contextlib.contextmanager
def weights_only_torch_load():
    """Make every torch.load inside (DeepSpeed's zero_to_fp32 included) unpickle weights only, never code."""
    original = torch.load

    def safe_load(*args, **kwargs):
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = safe_load
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            yield
    finally:
        torch.load = original


def load_model_state(run_dir: str | Path, step: int | None = None) -> tuple[HaloConfig, dict[str, torch.Tensor]]:
    """(model config, consolidated fp32 state dict on CPU) of a complete checkpoint of any ZeRO stage."""
    with weights_only_torch_load():
        return _load_model_state(run_dir, step)


def _load_model_state(run_dir, step):
    tag_dir = find_checkpoint(run_dir, step)
    state = read_trainer_state(tag_dir)
    config = HaloConfig.from_dict(state.model, source=str(tag_dir / TRAINER_STATE))
    model_file = tag_dir / "mp_rank_00_model_states.pt"
    precision = state.run_config.get("train", {}).get("precision", "fp32")
    if state.zero_stage == 0 and model_file.is_file():
        saved = torch.load(model_file, map_location="cpu", weights_only=True)
        weights = saved["module"] if precision == "fp32" else zero0_fp32_masters(saved, config, model_file)
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        weights = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    weights = {k: v.detach().float().cpu().clone() for k, v in weights.items()}
    if config.tie_embeddings and "embed.weight" in weights:
        weights["lm_head.weight"] = weights["embed.weight"]
    return config, weights


def zero0_fp32_masters(saved: dict, config: HaloConfig, source: Path) -> dict[str, torch.Tensor]:
    """The fp32 master weights of a ZeRO-0 bf16/fp16 checkpoint (DeepSpeed's zero_to_fp32 reads only
    ZeRO-1..3 files). DeepSpeed keeps them in its optimizer's state, in the order of our parameter
    groups (train/optim.py): "fp32_groups", a list of tensors per group, or "fp32_groups_flat", one flat
    tensor per group. Each master, rounded, must equal the 16-bit weight it updates."""
    from ..model import HaloSModel
    from .optim import param_groups

    half = saved["module"]
    optimizer = saved.get("optimizer") or {}
    groups = optimizer.get("fp32_groups") or optimizer.get("fp32_groups_flat")
    with torch.device("meta"):
        model = HaloSModel(config)
    names = {id(p): name for name, p in model.named_parameters()}
    group_names = [[names[id(p)] for p in group["params"]] for group in param_groups(model, 0.0)]
    if groups is None or len(groups) != len(group_names):
        raise CheckpointError(f"{source}: no fp32 master weights of {len(group_names)} parameter groups in its "
                              "optimizer state; export with --dtype of the run's precision from another checkpoint")
    weights = dict(half)
    for names_in_group, masters in zip(group_names, groups):
        if torch.is_tensor(masters):
            masters = masters.split([half[n].numel() for n in names_in_group])
        for name, master in zip(names_in_group, masters, strict=True):
            master = master.view(half[name].shape)
            if not torch.equal(master.to(half[name].dtype), half[name]):
                raise CheckpointError(f"{source}: the fp32 master of {name} does not round to its "
                                      f"{half[name].dtype} weight: the optimizer state does not belong to this model")
            weights[name] = master
    return weights
