"""HALO-S attention backends. Every one computes the contract in docs/attention.md; `config.attention` picks one."""

from __future__ import annotations

import importlib
import os

import torch

from ..config import HaloConfig
from .dense import dense_attention
from .gather import gather_attention
from .neighbors import keys_per_query, layer_key, neighbor_index, random_targets, token_mask
from .reference import reference_attention


def _flex():
    from .flex import flex_attention, flex_attention_halo

    if flex_attention is None:
        raise ValueError("HaloConfig.attention='flex': this torch has no FlexAttention (needs torch >= 2.5)")
    return flex_attention_halo


def _triton():
    try:
        module = importlib.import_module(".triton_kernel", __name__)
    except ImportError as e:
        raise ValueError(f"HaloConfig.attention='triton': the Triton backend is unavailable ({e})") from e
    return module.triton_attention


def triton_usable(device: torch.device) -> bool:
    """Triton runs on CUDA, or on CPU under TRITON_INTERPRET=1 (slow; correctness tests only)."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        get_attention_fn("triton")
    except ValueError:
        return False
    return True


def resolve_backend(name: str, device: torch.device | str) -> str:
    """The concrete backend for `name` on `device`; ValueError when it cannot run there."""
    device = torch.device(device)
    if name == "auto":
        if device.type == "cuda":
            return "triton" if triton_usable(device) else "flex"
        return "gather"
    if name == "triton" and not triton_usable(device):
        raise ValueError(
            f"HaloConfig.attention='triton' cannot run on device {device}: it needs CUDA "
            "(or TRITON_INTERPRET=1 for slow CPU checks); use 'gather' or 'auto' on CPU"
        )
    if name == "flex":
        get_attention_fn("flex")
        if device.type != "cuda" and torch.is_grad_enabled():
            raise ValueError(
                f"HaloConfig.attention='flex' cannot train on device {device}: FlexAttention has no CPU "
                "backward; use 'gather' (or run under torch.no_grad() for inference)"
            )
    return name


_LOADERS = {"reference": lambda: reference_attention, "gather": lambda: gather_attention,
            "dense": lambda: dense_attention, "flex": _flex, "triton": _triton}
_loaded: dict = {}  # backend name -> function: torch.compile reads the dict, where an import would break the graph


def get_attention_fn(name: str):
    """The function for a concrete backend name (not 'auto': resolve it first)."""
    fn = _loaded.get(name)
    if fn is None:
        if name not in _LOADERS:
            raise ValueError(f"HaloConfig.attention={name!r}: not a concrete backend ({', '.join(_LOADERS)})")
        fn = _loaded[name] = _LOADERS[name]()
    return fn


def halo_attention(q, k, v, global_k, global_v, config: HaloConfig, layer: int, backend: str | None = None):
    """q [B, H, N, D]; k, v [B, KV, N, D]; global_k, global_v [KV, G, D] -> [B, H, N, D]."""
    name = resolve_backend(backend or config.attention, q.device)
    return get_attention_fn(name)(q, k, v, global_k, global_v, config, layer)


__all__ = [
    "halo_attention", "resolve_backend", "get_attention_fn", "triton_usable", "token_mask",
    "neighbor_index", "random_targets", "keys_per_query", "layer_key", "reference_attention",
    "gather_attention", "dense_attention",
]
