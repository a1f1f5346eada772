"""Triton backend: HALO-S attention as one fused forward kernel and a deterministic fused backward.

`triton_attention` has the arguments and result of `reference_attention`. Under torch.compile it is the
torch.library custom op `halo_pretrain::attention` (registered fake and autograd, so graphs stay whole);
in eager mode an autograd.Function around the same kernels (less host time per call). Activation
checkpointing recomputes bit-identical outputs: no kernel uses atomics. Global keys carry no RoPE (the
caller applies RoPE to token q/k only). Runs on CUDA, or on CPU under TRITON_INTERPRET=1 for the tests.
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch
import triton
import triton.language as tl

from ..config import HaloConfig
from .neighbors import layer_key, random_slots
from .triton_bwd import halo_bwd_dkv_kernel, halo_bwd_dq_kernel
from .triton_fwd import halo_fwd_kernel

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_HEAD_DIM = 128
LOG2E = 1.4426950408889634

# (block, num_warps, num_stages) per (kernel, block_d, dtype); benchmarks override.
TILE_OVERRIDES: dict[tuple[str, int, torch.dtype], tuple[int, int, int]] = {}


def tile_config(kernel: str, block_d: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int, int]:
    """(block, num_warps, num_stages) for kernel 'fwd', 'dq' or 'dkv'. Tiles are square (block x block):
    a dilated band is a query tile shifted by the offset. num_stages > 1 keeps that many bands' loads
    in flight."""
    override = TILE_OVERRIDES.get((kernel, block_d, dtype))
    if override is not None:
        return override
    if device.type != "cuda":  # interpreter: small tiles, so short test sequences still span several
        return 16, 1, 1
    if dtype == torch.float32:
        return 32, 4, 2
    # the winners of benchmarks/attention.py --sweep on an H100 at N=65,536: many small programs hide the
    # latency of the shifted band loads better than fewer large ones
    if kernel == "fwd":
        return 16, 1, 3
    return (16, 1, 2) if block_d <= 64 else (16, 2, 3)


def _check_inputs(q, k, v, global_k, global_v) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"triton_attention: q, k, v must be 4-D [B, heads, N, D], got q.shape={tuple(q.shape)}, "
                         f"k.shape={tuple(k.shape)}, v.shape={tuple(v.shape)}")
    b, h, n, d = q.shape
    kv = k.shape[1]
    if k.shape != (b, kv, n, d) or v.shape != k.shape:
        raise ValueError(f"triton_attention: k.shape={tuple(k.shape)} and v.shape={tuple(v.shape)} must be "
                         f"[{b}, KV, {n}, {d}] for q.shape={tuple(q.shape)}")
    if kv == 0 or h % kv:
        raise ValueError(f"triton_attention: num_heads={h} must be a multiple of num_kv_heads={kv}")
    if global_k.dim() != 3 or global_k.shape[0] != kv or global_k.shape[2] != d or global_v.shape != global_k.shape:
        raise ValueError(f"triton_attention: global_k.shape={tuple(global_k.shape)} and global_v.shape="
                         f"{tuple(global_v.shape)} must be [{kv}, G, {d}]")
    if d > MAX_HEAD_DIM:
        raise ValueError(f"triton_attention: head_dim={d} is not supported (at most {MAX_HEAD_DIM})")
    if q.dtype not in DTYPES:
        raise ValueError(f"triton_attention: dtype={q.dtype} is not supported (bfloat16, float16, float32)")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"triton_attention: k.dtype={k.dtype} and v.dtype={v.dtype} must equal q.dtype={q.dtype}")
    for name, t in (("k", k), ("v", v), ("global_k", global_k), ("global_v", global_v)):
        if t.device != q.device:
            raise ValueError(f"triton_attention: {name}.device={t.device} differs from q.device={q.device}")
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"triton_attention: device={q.device} is not supported: it needs CUDA "
                         "(or TRITON_INTERPRET=1 on CPU for slow checks)")


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _block_g(num_globals: int) -> int:
    """The global slots' key tile (tl.dot needs at least 16 columns)."""
    return max(16, triton.next_power_of_2(num_globals))


def _mma_args(dtype: torch.dtype) -> dict:
    """Operand dtype and precision of the kernels' tl.dot (fp32 operands use exact 'ieee' products)."""
    mma_dtype = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}[dtype]
    if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        mma_dtype = tl.float32  # same products: bf16 values are exact in fp32
    return {"MMA_DTYPE": mma_dtype, "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32"}


def _rows_last(t: torch.Tensor) -> torch.Tensor:
    """The kernels take any batch/head/row strides but need unit stride along head_dim."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


@lru_cache(maxsize=32)
def _offsets_tensor(offsets: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(offsets or (0,), dtype=torch.int32, device=device)


@lru_cache(maxsize=128)  # one entry per (sequence length, layer); 12 MB at 1M tokens
def random_inverse(n: int, window: int, offsets: tuple[int, ...], num_random: int, key: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR of the random edges by target: queries RANDOM_QUERY[start[t]:start[t+1]] read key t at random.

    Applies the contract's dedup (a target equal to a dilated position or an earlier slot's target is dropped),
    so every random edge appears once. Depends only on (n, config, layer): cached.
    """
    q = torch.arange(n, dtype=torch.int64, device=device)
    targets, valid_all = random_slots(q, window, offsets, num_random, key)
    start = torch.zeros(n + 1, dtype=torch.int32, device=device)
    if not num_random:
        return start, torch.zeros(1, dtype=torch.int32, device=device)
    t = targets[valid_all]
    queries = q[:, None].expand(-1, num_random)[valid_all]
    order = torch.argsort(t, stable=True)
    start[1:] = torch.cumsum(torch.bincount(t, minlength=n), 0)
    by_target = queries[order].to(torch.int32)
    return start, by_target if by_target.numel() else torch.zeros(1, dtype=torch.int32, device=device)


def _forward(q, k, v, global_k, global_v, window, offsets, num_random, key):
    b, h, n, d = q.shape
    kv, g = k.shape[1], global_k.shape[1]
    q, k, v = _rows_last(q), _rows_last(k), _rows_last(v)
    out = torch.empty((b, h, n, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, n), dtype=torch.float32, device=q.device)
    if n == 0:
        return out, lse
    gk, gv = (global_k.contiguous(), global_v.contiguous()) if g else (q, q)
    block_d = _block_d(d)
    block, warps, stages = tile_config("fwd", block_d, q.dtype, q.device)
    grid = (triton.cdiv(n, block) * (h // kv), b * kv)
    halo_fwd_kernel[grid](
        q, k, v, gk, gv, _offsets_tensor(tuple(offsets), q.device), out, lse,
        *_strides(q), *_strides(k), *_strides(v),
        n, h, kv, window, len(offsets), g, num_random, key, d**-0.5 * LOG2E,
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK=block, BLOCK_G=_block_g(g), **_mma_args(q.dtype),
        num_warps=warps, num_stages=stages,
    )
    return out, lse


def _backward(dout, q, k, v, global_k, global_v, out, lse, window, offsets, num_random, key):
    b, h, n, d = q.shape
    kv, g = k.shape[1], global_k.shape[1]
    group = h // kv
    q, k, v = _rows_last(q), _rows_last(k), _rows_last(v)
    dout, out = dout.contiguous(), out.contiguous()
    dq = torch.empty((b, h, n, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((b, kv, n, d), dtype=k.dtype, device=q.device)
    dv = torch.empty((b, kv, n, d), dtype=v.dtype, device=q.device)
    if n == 0:
        return dq, dk, dv, torch.zeros_like(global_k), torch.zeros_like(global_v)
    delta = torch.empty((b, h, n), dtype=torch.float32, device=q.device)
    block_d = _block_d(d)
    mma_args = _mma_args(q.dtype)
    scale = d**-0.5
    offsets_t = _offsets_tensor(tuple(offsets), q.device)

    block, warps, stages = tile_config("dq", block_d, q.dtype, q.device)
    q_tiles = triton.cdiv(n, block)
    dgk_part = torch.empty((b, h, q_tiles, g, d), dtype=torch.float32, device=q.device)
    dgv_part = torch.empty_like(dgk_part)
    gk, gv = (global_k.contiguous(), global_v.contiguous()) if g else (q, q)
    halo_bwd_dq_kernel[(q_tiles * group, b * kv)](
        q, k, v, gk, gv, offsets_t, out, dout, lse, delta, dq, dgk_part, dgv_part,
        *_strides(q), *_strides(k), *_strides(v),
        n, h, kv, window, len(offsets), g, num_random, key, scale * LOG2E, scale,
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK=block, BLOCK_G=_block_g(g), **mma_args,
        num_warps=warps, num_stages=stages,
    )

    random_start, random_query = random_inverse(n, window, tuple(offsets), num_random, key, q.device)
    block, warps, stages = tile_config("dkv", block_d, q.dtype, q.device)
    halo_bwd_dkv_kernel[(triton.cdiv(n, block), b * kv)](
        q, k, v, dout, lse, delta, offsets_t, random_start, random_query, dk, dv,
        *_strides(q), *_strides(k), *_strides(v),
        n, h, kv, window, len(offsets), scale * LOG2E, scale,
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK=block, **mma_args,
        num_warps=warps, num_stages=stages,
    )
    # fixed-order sums over batch and query tiles, then over the heads sharing a KV head
    dgk = (dgk_part.sum((0, 2)) * scale).view(kv, group, g, d).sum(1)
    dgv = dgv_part.sum((0, 2)).view(kv, group, g, d).sum(1)
    return dq, dk, dv, dgk.to(global_k.dtype), dgv.to(global_v.dtype)


@torch.library.custom_op("halo_pretrain::attention", mutates_args=())
def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, global_k: torch.Tensor,
                 global_v: torch.Tensor, window: int, offsets: list[int], num_random: int,
                 key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, H, N, D], lse [B, H, N] fp32, log2 domain)."""
    return _forward(q, k, v, global_k, global_v, window, offsets, num_random, key)


@attention_op.register_fake
def _(q, k, v, global_k, global_v, window, offsets, num_random, key):
    b, h, n, d = q.shape
    return q.new_empty((b, h, n, d)), q.new_empty((b, h, n), dtype=torch.float32)


@torch.library.custom_op("halo_pretrain::attention_backward", mutates_args=())
def attention_backward_op(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, global_k: torch.Tensor,
    global_v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, window: int, offsets: list[int],
    num_random: int, key: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dglobal_k, dglobal_v)."""
    return _backward(dout, q, k, v, global_k, global_v, out, lse, window, offsets, num_random, key)


@attention_backward_op.register_fake
def _(dout, q, k, v, global_k, global_v, out, lse, window, offsets, num_random, key):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            global_k.new_empty(global_k.shape), global_v.new_empty(global_v.shape))


def _setup_context(ctx, inputs, output):
    q, k, v, global_k, global_v, window, offsets, num_random, key = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, global_k, global_v, out, lse)
    ctx.pattern = (window, offsets, num_random, key)


def _autograd_backward(ctx, dout, _dlse):
    q, k, v, global_k, global_v, out, lse = ctx.saved_tensors
    grads = attention_backward_op(dout, q, k, v, global_k, global_v, out, lse, *ctx.pattern)
    return (*grads, None, None, None, None)


attention_op.register_autograd(_autograd_backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """The same kernels as `attention_op`, for eager mode: the custom op's autograd wrapper added ~0.4 ms
    of host time per forward+backward on the H100 host (1.25 ms vs 0.85 ms), which matters below ~4k tokens."""

    @staticmethod
    def forward(ctx, q, k, v, global_k, global_v, window, offsets, num_random, key):
        out, lse = _forward(q, k, v, global_k, global_v, window, offsets, num_random, key)
        ctx.save_for_backward(q, k, v, global_k, global_v, out, lse)
        ctx.pattern = (window, offsets, num_random, key)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, global_k, global_v, out, lse = ctx.saved_tensors
        grads = _backward(dout, q, k, v, global_k, global_v, out, lse, *ctx.pattern)
        return (*grads, None, None, None, None)


def triton_attention(q, k, v, global_k, global_v, config: HaloConfig, layer: int):
    """q [B, H, N, D]; k, v [B, KV, N, D]; global_k, global_v [KV, G, D] -> [B, H, N, D].

    Global slots are cast to q's dtype (parameters may be kept in fp32 under mixed precision). Under
    torch.compile this is the custom op `halo_pretrain::attention`; in eager mode an autograd.Function
    around the same kernels.
    """
    _check_inputs(q, k, v, global_k, global_v)
    args = (q, k, v, global_k.to(q.dtype), global_v.to(q.dtype), config.local_window, list(config.offsets),
            config.num_random, layer_key(config.seed, layer))
    if torch.compiler.is_compiling():
        return attention_op(*args)[0]
    return _EagerAttention.apply(*args)


__all__ = ["triton_attention", "random_inverse", "tile_config", "TILE_OVERRIDES"]
