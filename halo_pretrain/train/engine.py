"""The DeepSpeed engine: batch arithmetic, the DeepSpeed config, activation checkpointing."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..attention import get_attention_fn, resolve_backend
from .optim import build_optimizer
from .run_config import ConfigError, RunConfig

DS_CONFIGS_DIR = Path(__file__).resolve().parent.parent / "ds_configs"  # package data


@dataclass(frozen=True)
class BatchPlan:
    micro_batch_size: int
    grad_accum: int
    world_size: int

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size


def batch_plan(cfg: RunConfig, world_size: int) -> BatchPlan:
    """micro_batch_size x grad_accum x world_size = global_batch_size, or a ConfigError saying how to fix it."""
    t = cfg.train
    mb, ga, gbs = t.micro_batch_size, t.grad_accum, t.global_batch_size
    per_step = mb * world_size
    if ga is None and gbs is None:
        ga = 1
    elif ga is None:
        if gbs % per_step:
            raise ConfigError(
                f"train.global_batch_size={gbs} is not divisible by train.micro_batch_size={mb} x world size "
                f"{world_size} = {per_step}; pick a global batch that is a multiple of {per_step}")
        ga = gbs // per_step
    elif gbs is not None and gbs != ga * per_step:
        raise ConfigError(
            f"train.global_batch_size={gbs} != train.micro_batch_size={mb} x train.grad_accum={ga} x world size "
            f"{world_size} = {ga * per_step}; drop one of grad_accum / global_batch_size or make them agree"
            + (f" (grad_accum={gbs // per_step})" if gbs % per_step == 0 else ""))
    return BatchPlan(mb, ga, world_size)


def base_ds_config(cfg: RunConfig) -> tuple[dict, Path]:
    ds = cfg.deepspeed
    if ds.config:
        path = Path(ds.config)
    else:
        name = f"zero{ds.zero_stage}" + ("_offload" if ds.offload else "")
        path = DS_CONFIGS_DIR / f"{name}.json"
        if ds.offload and ds.zero_stage not in (2, 3):
            raise ConfigError(f"deepspeed.offload=true needs deepspeed.zero_stage 2 or 3 (got {ds.zero_stage})")
    if not path.is_file():
        raise ConfigError(f"DeepSpeed config {path} not found; set deepspeed.config to a JSON file")
    try:
        return json.loads(path.read_text()), path
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from e


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def build_ds_config(cfg: RunConfig, plan: BatchPlan) -> dict:
    """ds_configs/zero<N>.json, filled in from the run config; deepspeed.extra is merged last."""
    config, path = base_ds_config(cfg)
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage != cfg.deepspeed.zero_stage:
        raise ConfigError(f"{path} sets zero_optimization.stage={stage} but deepspeed.zero_stage="
                          f"{cfg.deepspeed.zero_stage}; make them agree")
    precision = cfg.train.precision
    config.update({
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.grad_accum,
        "train_batch_size": plan.global_batch_size,
        "gradient_clipping": cfg.train.grad_clip,
        "steps_per_print": 10**9,
        "zero_allow_untested_optimizer": True,  # ours is torch's AdamW with a skippable step()
        "wall_clock_breakdown": False,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
    })
    if cfg.deepspeed.offload:
        config["zero_force_ds_cpu_optimizer"] = False  # our AdamW (skippable, grouped) runs on the CPU copy
    return _merge(config, cfg.deepspeed.extra)


def set_activation_checkpointing(model, every_k: int) -> None:
    """Recompute every k-th block in backward (0: none, 1: every block) through DeepSpeed's API."""
    if every_k <= 0:
        model.block_runner = None
        return
    import deepspeed

    def run_block(block, x, cos, sin, backend):
        if block.attn.layer % every_k == 0 and torch.is_grad_enabled():
            return deepspeed.checkpointing.checkpoint(lambda h: block(h, cos, sin, backend), x)
        return block(x, cos, sin, backend)

    model.block_runner = run_block


# Backends whose compiled graph can take the layer's index as a runtime int (the Triton op's hash key), so
# one graph serves every block; the torch-traced ones (gather, reference, flex) build each layer's
# pattern while tracing and need a graph per layer.
LAYER_AS_RUNTIME_INT = ("triton",)


def compile_model(model: torch.nn.Module, activation_checkpointing: int, device: torch.device,
                  compiler: str = "inductor") -> None:
    """torch.compile the whole model with its loss as one graph (norms, RoPE, SwiGLU and cross-entropy
    fused; 127 vs 222 ms per 65k-token step against compiling block by block on an H100,
    docs/benchmarks.md). With activation checkpointing, block by block: DeepSpeed's checkpoint function
    stays outside the compiled graphs. The attention backend is loaded first: an import inside the
    traced forward would split the graph at every layer."""
    backend = resolve_backend(model.config.attention, device)
    get_attention_fn(backend)
    if activation_checkpointing > 0:
        # The blocks share one forward. Dynamo specialises on int attributes of modules, here each block's
        # layer index, so it compiled one graph per layer and per grad mode, and past its recompile limit
        # (8) ran the remaining blocks eager: at 1.3b, 2/3 of the HALO-S blocks, never the dense ones.
        if backend in LAYER_AS_RUNTIME_INT:
            torch._dynamo.config.allow_unspec_int_on_nn_module = True
        else:
            limit = 2 * len(model.blocks) + 4  # a forward and a recompute graph per layer, and slack
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
        for block in model.blocks:
            block.compile(backend=compiler)
    else:
        model.compile(backend=compiler)


def build_engine(cfg: RunConfig, model: torch.nn.Module, plan: BatchPlan, device: torch.device,
                 universal: bool = False):
    """(engine, our optimizer, DeepSpeed config) from deepspeed.initialize; the process group must exist.
    universal: the checkpoint to resume is loaded through DeepSpeed's universal format (resharding)."""
    import deepspeed

    ds_config = build_ds_config(cfg, plan)
    if universal:
        ds_config = _merge(ds_config, {"checkpoint": {"load_universal": True}})
    if cfg.train.activation_checkpointing:
        deepspeed.checkpointing.configure(None, deepspeed_config=ds_config)
    set_activation_checkpointing(model, cfg.train.activation_checkpointing)
    if cfg.train.compile:
        compile_model(model, cfg.train.activation_checkpointing, device)
    o = cfg.optim
    optimizer = build_optimizer(model, lr=o.lr, weight_decay=o.weight_decay, betas=(o.beta1, o.beta2), eps=o.eps)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine, optimizer, ds_config
