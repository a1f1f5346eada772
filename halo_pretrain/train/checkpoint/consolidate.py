"""One fp32 state dict on the CPU from a checkpoint of any ZeRO stage, for export (`halo-export`)."""

from __future__ import annotations

from pathlib import Path

import torch

from ...config import HaloConfig
from .layout import TRAINER_STATE, find_checkpoint, read_trainer_state
from .safe_load import safe_torch_load, weights_only_torch_load

MODEL_STATES = "mp_rank_00_model_states.pt"


def load_model_state(run_dir: str | Path, step: int | None = None) -> tuple[HaloConfig, dict[str, torch.Tensor]]:
    """(model config, consolidated fp32 state dict on CPU) of a complete checkpoint of any ZeRO stage."""
    tag_dir = find_checkpoint(run_dir, step)
    state = read_trainer_state(tag_dir)
    config = HaloConfig.from_dict(state.model, source=str(tag_dir / TRAINER_STATE))
    model_file = tag_dir / MODEL_STATES
    precision = state.run_config.get("train", {}).get("precision", "fp32")
    if state.zero_stage == 0 and precision == "fp32" and model_file.is_file():
        weights = safe_torch_load(model_file, map_location="cpu")["module"]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with weights_only_torch_load():
            weights = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    weights = {k: v.detach().float().cpu().clone() for k, v in weights.items()}
    if config.tie_embeddings and "embed.weight" in weights:
        weights["lm_head.weight"] = weights["embed.weight"]
    return config, weights
