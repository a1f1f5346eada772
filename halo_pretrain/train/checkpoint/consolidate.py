"""One fp32 state dict on the CPU from a checkpoint of any ZeRO stage, for export (`halo-export`)."""

from __future__ import annotations

from pathlib import Path

import torch

from ...config import HaloConfig
from .layout import TRAINER_STATE, CheckpointError, find_checkpoint, read_trainer_state
from .safe_load import safe_torch_load, weights_only_torch_load

MODEL_STATES = "mp_rank_00_model_states.pt"


def load_model_state(run_dir: str | Path, step: int | None = None) -> tuple[HaloConfig, dict[str, torch.Tensor]]:
    """(model config, consolidated fp32 state dict on CPU) of a complete checkpoint of any ZeRO stage."""
    tag_dir = find_checkpoint(run_dir, step)
    state = read_trainer_state(tag_dir)
    config = HaloConfig.from_dict(state.model, source=str(tag_dir / TRAINER_STATE))
    model_file = tag_dir / MODEL_STATES
    precision = state.run_config.get("train", {}).get("precision", "fp32")
    if state.zero_stage == 0 and model_file.is_file():
        saved = safe_torch_load(model_file, map_location="cpu")
        weights = saved["module"] if precision == "fp32" else zero0_fp32_masters(saved, config, model_file)
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with weights_only_torch_load():
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
    from ...model import HaloSModel
    from ..optim import param_groups

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
