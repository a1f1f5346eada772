"""The on-disk layout of checkpoints and its integrity: which checkpoints exist, which are complete,
and what is wrong with the others (a `Problem`, typed, never parsed back from its message)."""

from __future__ import annotations

import enum
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ...config import HaloConfig
from ...fileio import sha256_file, write_atomic
from .safe_load import UnsafeFileError, safe_torch_load

TAG_RE = re.compile(r"^step_(\d{8,})$")
COMPLETE, LATEST, TRAINER_STATE = "complete.json", "latest", "trainer_state.json"
SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "num_globals",
                "use_swiglu", "intermediate_size", "norm", "tie_embeddings")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used or written; the message says which and what to do."""


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done (skipped ones included)
    consumed_samples: int = 0
    tokens: int = 0
    nonfinite_steps: int = 0  # steps skipped for a non-finite loss or gradient
    world_size: int = 1
    zero_stage: int = 0
    model: dict = field(default_factory=dict)
    run_config: dict = field(default_factory=dict)


class ProblemKind(enum.Enum):
    UNFINISHED = "the save did not finish (no complete.json)"  # normal after a crash mid-save: skipped quietly
    MISSING = "is missing"
    SIZE = "is truncated or changed"
    CHECKSUM = "does not match its checksum (corrupted)"
    UNSAFE = "holds more than tensors and plain data: refused unread, nothing in it ran"
    UNREADABLE = "is unreadable"
    LOAD_FAILED = "failed to load"
    NONFINITE_WEIGHTS = "holds non-finite weights"


@dataclass(frozen=True)
class Problem:
    """Why a checkpoint (or one of its files) cannot be used."""

    kind: ProblemKind
    file: str | None = None  # relative to the checkpoint directory
    detail: str = ""

    @property
    def expected(self) -> bool:
        """A save cut short is the normal state after a crash, not news."""
        return self.kind is ProblemKind.UNFINISHED

    def __str__(self) -> str:
        where = f"{self.file} " if self.file else ""
        return f"{where}{self.kind.value}" + (f" ({self.detail})" if self.detail else "")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> int:
    return int(TAG_RE.match(tag).group(1))


def tag_dirs(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Every step_* directory, newest first, complete or not."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if p.is_dir() and (m := TAG_RE.match(p.name))]
    return sorted(found, reverse=True)


def read_latest(ckpt_dir: Path) -> str | None:
    try:
        return (ckpt_dir / LATEST).read_text().strip() or None
    except OSError:
        return None


def write_latest(ckpt_dir: Path, tag: str) -> None:
    write_atomic(ckpt_dir / LATEST, tag + "\n")


def candidates(ckpt_dir: Path) -> list[Path]:
    """Checkpoints to try, best first: the one `latest` names, then the others newest first."""
    tags = [p for _, p in tag_dirs(ckpt_dir)]
    latest = read_latest(ckpt_dir)
    first = [p for p in tags if p.name == latest]
    return first + [p for p in tags if p.name != latest]


def files_of(tag_dir: Path) -> list[str]:
    """Every file under a checkpoint directory, relative to it, sorted (the same list on every rank)."""
    return sorted(str(p.relative_to(tag_dir)) for p in tag_dir.rglob("*") if p.is_file())


def write_complete(tag_dir: Path, step: int, sums: dict[str, str]) -> None:
    """Mark a checkpoint complete: every file's size and SHA-256, written last."""
    files = {rel: (tag_dir / rel).stat().st_size for rel in sorted(sums)}
    write_atomic(tag_dir / COMPLETE, json.dumps({"step": step, "files": files, "sha256": sums}, indent=1))


def completeness_problem(tag_dir: Path) -> Problem | None:
    """None when every file complete.json lists is there with its size."""
    marker = tag_dir / COMPLETE
    if not marker.is_file():
        return Problem(ProblemKind.UNFINISHED)
    try:
        files = json.loads(marker.read_text())["files"]
        items = [(str(rel), int(size)) for rel, size in files.items()]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return Problem(ProblemKind.UNREADABLE, COMPLETE, str(e))
    for rel, size in items:
        path = tag_dir / rel
        if not path.is_file():
            return Problem(ProblemKind.MISSING, rel)
        if path.stat().st_size != size:
            return Problem(ProblemKind.SIZE, rel, f"{path.stat().st_size} bytes, {size} expected")
    return None


def is_complete(tag_dir: Path) -> bool:
    return completeness_problem(tag_dir) is None


def _share(tag_dir: Path, rank: int, world_size: int) -> tuple[dict[str, str], list[str]]:
    """(every file's SHA-256 from complete.json, this rank's share of the files: every world_size-th)."""
    sums = json.loads((tag_dir / COMPLETE).read_text()).get("sha256", {})
    return sums, sorted(sums)[rank::world_size]


def checksum_problem(tag_dir: Path, rank: int = 0, world_size: int = 1) -> Problem | None:
    """This rank's share of the files of a complete checkpoint against their SHA-256."""
    sums, mine = _share(tag_dir, rank, world_size)
    for rel in mine:
        if sha256_file(tag_dir / rel) != sums[rel]:
            return Problem(ProblemKind.CHECKSUM, rel)
    return None


def unpickle_problem(tag_dir: Path, rank: int = 0, world_size: int = 1) -> Problem | None:
    """This rank's share of the .pt files unpickled weights-only, memory-mapped (their tensors are not
    read): a file that would run code is refused here, before DeepSpeed opens it. Checksums cannot
    protect against that: whoever can write the file can rewrite them."""
    _, mine = _share(tag_dir, rank, world_size)
    for rel in mine:
        if not rel.endswith(".pt"):
            continue
        try:
            safe_torch_load(tag_dir / rel, map_location="cpu", mmap=True)
        except UnsafeFileError as e:
            return Problem(ProblemKind.UNSAFE, rel, e.detail)
        except Exception as e:  # a damaged archive raises anything from zipfile or torch
            return Problem(ProblemKind.UNREADABLE, rel, f"{type(e).__name__}: {e}")
    return None


def read_trainer_state(tag_dir: Path) -> TrainerState:
    return TrainerState(**json.loads((tag_dir / TRAINER_STATE).read_text()))


def write_trainer_state(tag_dir: Path, state: TrainerState) -> None:
    write_atomic(tag_dir / TRAINER_STATE, json.dumps(asdict(state), indent=1))


def trainer_state_problem(tag_dir: Path) -> Problem | None:
    try:
        read_trainer_state(tag_dir)
    except (OSError, ValueError, TypeError) as e:
        return Problem(ProblemKind.UNREADABLE, TRAINER_STATE, str(e))
    return None


def check_same_shape(tag_dir: Path, saved: dict, current: HaloConfig) -> None:
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, this run {getattr(current, k)!r}"
             for k in SHAPE_FIELDS if saved.get(k) != getattr(current, k)]
    if diffs:
        raise CheckpointError(
            f"{tag_dir} was written by a model of a different shape ({'; '.join(diffs)}); resume with the "
            "model.* keys it was trained with, or use a new run.dir / checkpoint.dir to start a new run")


def checkpoint_dir_of(run_dir: Path) -> Path:
    config = run_dir / "config.yaml"
    if config.is_file():
        import yaml

        saved = (yaml.safe_load(config.read_text()) or {}).get("checkpoint", {}).get("dir")
        if saved:
            return Path(saved)
    return run_dir / "checkpoints"


def find_checkpoint(run_dir: str | Path, step: int | None = None) -> Path:
    """The complete, intact checkpoint of `step`, or the newest one (warning why newer ones were
    passed over); a clear error listing what exists."""
    import warnings

    run_dir = Path(run_dir)
    ckpt_dir = checkpoint_dir_of(run_dir)
    complete = [(s, p) for s, p in tag_dirs(ckpt_dir) if is_complete(p)]
    steps = ", ".join(str(s) for s, _ in sorted(complete)) or "none"
    chosen = [p for p in candidates(ckpt_dir) if is_complete(p)] if step is None else \
        [p for s, p in complete if s == step]
    for p in chosen:
        problem = checksum_problem(p)
        if problem is None:
            return p
        if step is not None:
            raise CheckpointError(f"{p}: {problem}; complete steps: {steps}")
        warnings.warn(f"{p}: {problem}; using the previous complete checkpoint")
    if step is None:
        raise CheckpointError(f"{run_dir}: no complete checkpoint in {ckpt_dir}")
    raise CheckpointError(f"{run_dir}: no complete checkpoint of step {step}; complete steps: {steps}")
