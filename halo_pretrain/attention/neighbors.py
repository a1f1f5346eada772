"""The HALO-S neighbour set (the contract: docs/attention.md): which keys a query at position q reads.

A query at q reads, as a set: the layer's global slots; the window q-W+1..q; q-d for each dilated
offset d <= q; and `num_random` positions drawn from 0..q-W (only when q >= W) by a counter-based
hash of (seed, layer, q, slot). Everything here is a pure function of (config, layer, q).

The hash, in uint32 arithmetic (every backend, Triton included, computes exactly this):

    mix32(x):  x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x68E31DA5; x ^= x >> 16
    layer_key = mix32(mix32(seed) ^ layer)
    target(q, slot) = mix32(mix32(layer_key ^ q) ^ slot) % (q - W + 1)

Both multipliers are below 2**31, so the products fit in int64 before masking to 32 bits.

As a fixed-width row of slots (what `neighbor_index` returns and a kernel walks), duplicates are
removed by these rules, which make the valid slots exactly the set:
  window slot j (0 <= j < W):   position q-j, valid when q-j >= 0;
  dilated slot i:               position q-d_i, valid when d_i <= q and d_i >= W (else it is a window key);
  random slot r:                position t_r, valid when q >= W, t_r differs from every valid dilated
                                position and from t_s for every s < r (t_r <= q-W is never a window key).
"""

from __future__ import annotations

import torch

from ..config import HaloConfig

MASK32 = 0xFFFFFFFF
MUL1 = 0x7FEB352D
MUL2 = 0x68E31DA5


def mix32(x):
    """The 32-bit mixer, for Python ints or int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * MUL1) & MASK32
    x = x ^ (x >> 15)
    x = (x * MUL2) & MASK32
    return x ^ (x >> 16)


def layer_key(seed: int, layer: int) -> int:
    """The per-layer hash key (a Python int in [0, 2**32)); kernels take it as a scalar argument."""
    return mix32(mix32(seed & MASK32) ^ (layer & MASK32))


def random_target(key, q, slot, window):
    """Random neighbour `slot` of query q: Python ints (the readable definition) or, elementwise, int64
    tensors. Meaningful only where q >= window: below it a query has no random keys."""
    span = q - window + 1
    span = span.clamp(min=1) if isinstance(span, torch.Tensor) else max(span, 1)
    return mix32(mix32(key ^ q) ^ slot) % span


def random_slots(q: torch.Tensor, window: int, offsets, num_random: int, key: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The random slots of the query positions `q` (int64 [M]) -> (target int64 [M, R], valid bool [M, R]),
    deduplicated as the contract says: valid where q >= window, the target is no dilated position (a target
    is at least `window` behind q, so only offsets d >= window can meet it) and no earlier slot's target.
    One pass over [M] per slot and offset: memory stays O(M R) at a million tokens."""
    q = q.to(torch.int64)
    targets, valid = [], []
    for slot in range(num_random):
        t = random_target(key, q, slot, window)
        ok = q >= window
        for d in offsets:
            ok = ok & (q - t != d)
        for earlier in targets:
            ok = ok & (t != earlier)
        targets.append(t)
        valid.append(ok)
    if not targets:
        return q.new_empty(q.shape[0], 0), torch.zeros(q.shape[0], 0, dtype=torch.bool, device=q.device)
    return torch.stack(targets, 1), torch.stack(valid, 1)


def random_targets(q: torch.Tensor, config: HaloConfig, layer: int) -> torch.Tensor:
    """Random neighbours of the query positions `q` (int64 [M]) -> int64 [M, num_random], -1 where q < W
    (before deduplication: `random_slots` says which slots count)."""
    q = q.to(torch.int64)
    t, _ = random_slots(q, config.local_window, (), config.num_random, layer_key(config.seed, layer))
    return torch.where((q >= config.local_window)[:, None], t, torch.full_like(t, -1))


def slots_per_query(config: HaloConfig) -> int:
    """Width of a `neighbor_index` row: W window + |D| dilated + R random slots (globals not included)."""
    return config.local_window + len(config.offsets) + config.num_random


def neighbor_index(
    n: int, config: HaloConfig, layer: int, device=None, start: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token neighbours of queries start..n-1 as (index int64 [M, K], valid bool [M, K]), M = n-start.

    Invalid slots hold index 0. Each valid (query, key) pair appears exactly once.
    """
    w = config.local_window
    offs = torch.tensor(config.offsets, dtype=torch.int64, device=device)
    q = torch.arange(start, n, dtype=torch.int64, device=device)[:, None]  # [M, 1]

    win = q - torch.arange(w, dtype=torch.int64, device=device)[None, :]
    win_ok = win >= 0

    dil = q - offs[None, :]
    dil_ok = (dil >= 0) & (offs[None, :] >= w)

    rnd, rnd_ok = random_slots(q[:, 0], w, config.offsets, config.num_random, layer_key(config.seed, layer))

    index = torch.cat([win, dil, rnd], dim=1)
    valid = torch.cat([win_ok, dil_ok, rnd_ok], dim=1)
    return torch.where(valid, index, torch.zeros_like(index)), valid


def token_mask(n: int, config: HaloConfig, layer: int, device=None) -> torch.Tensor:
    """The dense boolean mask M[q, k] over token keys (globals excluded): the contract's definition."""
    index, valid = neighbor_index(n, config, layer, device=device)
    mask = torch.zeros(n, n, dtype=torch.bool, device=device)
    rows = torch.arange(n, device=device)[:, None].expand_as(index)
    mask[rows[valid], index[valid]] = True
    return mask


def keys_per_query(n: int, config: HaloConfig, layer: int) -> torch.Tensor:
    """Number of keys each query 0..n-1 reads in this layer, global slots included (int64 [n])."""
    _, valid = neighbor_index(n, config, layer)
    return valid.sum(1) + config.num_globals


def mean_keys_per_query(n: int, config: HaloConfig) -> float:
    """Average keys per query over positions 0..n-1 and all layers (what the attention FLOPs scale with)."""
    if config.attention == "dense":
        return (n + 1) / 2 + config.num_globals
    total = 0
    chunk = 1 << 16
    for layer in range(config.num_layers):
        for s in range(0, n, chunk):
            _, valid = neighbor_index(min(n, s + chunk), config, layer, start=s)
            total += int(valid.sum())
    return total / (n * config.num_layers) + config.num_globals
