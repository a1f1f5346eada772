"""Checkpoints that count only when complete, and resume from the newest usable one.

Layout under the checkpoint directory (default <run.dir>/checkpoints):

    step_00000100/            one checkpoint: DeepSpeed's files (any ZeRO stage) plus
        trainer_state.json    step, consumed samples, tokens, skipped steps, world size, ZeRO stage,
                              the model config and the run config
        rng/rank_00000.json   every RNG state of each rank (python, numpy, torch, cuda)
        complete.json         written last: every file of the checkpoint with its size and SHA-256
    latest                    the tag of the newest complete checkpoint, replaced atomically

A crash at any moment leaves `latest` naming a complete checkpoint. On start the run loads the
checkpoint `latest` names; if its files are missing, truncated, changed (checksum), hold anything
but tensors and plain data, fail to load or hold non-finite weights, it says so and falls back to
the previous complete one. Every file is loaded weights-only: a checkpoint cannot run code.

Modules, one concern each: layout (the on-disk layout and its integrity), safe_load (weights-only
unpickling), rng (random states), checkpointer (the DeepSpeed save and resume), consolidate (one fp32
state dict for export).
"""

from .checkpointer import Checkpointer, NonFiniteWeightsError, weights_are_finite
from .consolidate import load_model_state
from .layout import (CheckpointError, Problem, ProblemKind, TrainerState, check_same_shape, checkpoint_dir_of,
                     find_checkpoint, read_trainer_state, tag_for)
from .rng import rng_state, seed_all, set_rng_state
from .safe_load import UnsafeFileError, deepspeed_safe_globals, safe_torch_load, weights_only_torch_load

__all__ = ["Checkpointer", "NonFiniteWeightsError", "weights_are_finite", "load_model_state", "CheckpointError",
           "Problem", "ProblemKind", "TrainerState", "check_same_shape", "checkpoint_dir_of", "find_checkpoint",
           "read_trainer_state", "tag_for", "rng_state", "seed_all", "set_rng_state", "UnsafeFileError",
           "deepspeed_safe_globals", "safe_torch_load", "weights_only_torch_load"]
