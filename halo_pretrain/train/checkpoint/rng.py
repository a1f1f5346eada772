"""Every random state of a rank (Python, NumPy, torch, CUDA), saved as JSON beside the checkpoint
(`rng/rank_<r>.json`), so that a resumed run draws the same dropout masks as an uninterrupted one."""

from __future__ import annotations

import ast
import json
import random
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ...fileio import write_atomic

RNG_DIR = "rng"


def rng_state() -> dict:
    kind, keys, *rest = np.random.get_state()
    state = {
        "python": repr(random.getstate()),
        "numpy": [kind, keys.tolist(), *rest],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
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


def rng_file(tag_dir: Path, rank: int) -> Path:
    return tag_dir / RNG_DIR / f"rank_{rank:05d}.json"


def save_rng(tag_dir: Path, rank: int) -> None:
    path = rng_file(tag_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(rng_state()))


def restore_rng(tag_dir: Path, rank: int, world_size: int, saved_world_size: int, seed: int, step: int,
                say: Callable[[str], None]) -> None:
    """This rank's saved states; on another world size a seed of (seed, rank, step) instead."""
    path = rng_file(tag_dir, rank)
    if saved_world_size == world_size and path.is_file():
        set_rng_state(json.loads(path.read_text()))
        return
    seed_all(hash((seed, rank, step)) % 2**31)
    if rank == 0:
        say(f"world size changed ({saved_world_size} -> {world_size}): random states reseeded")
