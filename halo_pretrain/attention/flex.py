"""FlexAttention backend: the contract as a mask_mod over [G global slots, N tokens] keys."""

from functools import lru_cache

import torch

from ..config import HaloConfig
from .neighbors import layer_key, random_target

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # torch without FlexAttention
    flex_attention = create_block_mask = None

_compiled = None


def halo_mask_mod(config: HaloConfig, layer: int):
    g, w, r = config.num_globals, config.local_window, config.num_random
    offsets = config.offsets
    key = layer_key(config.seed, layer)

    def mask_mod(b, h, q_idx, kv_idx):
        t = kv_idx - g
        ok = (t <= q_idx) & (t > q_idx - w)
        for d in offsets:
            ok = ok | (t == q_idx - d)
        if r:
            q64, t64 = q_idx.to(torch.int64), t.to(torch.int64)
            for slot in range(r):  # as a set: a duplicate slot adds nothing, so no dedup here
                ok = ok | ((q64 >= w) & (t64 == random_target(key, q64, slot, w)))
        return (kv_idx < g) | ((t >= 0) & ok)

    return mask_mod


@lru_cache(maxsize=256)
def _block_mask(config_json: str, layer: int, n: int, device: str):
    config = HaloConfig.from_json(config_json)
    return create_block_mask(
        halo_mask_mod(config, layer), None, None, n, n + config.num_globals, device=device,
        _compile=device.startswith("cuda"),
    )


def flex_attention_halo(q, k, v, global_k, global_v, config: HaloConfig, layer: int):
    global _compiled
    b, h, n, d = q.shape
    k = torch.cat([global_k[None].expand(b, -1, -1, -1), k], dim=2)
    v = torch.cat([global_v[None].expand(b, -1, -1, -1), v], dim=2)
    block_mask = _block_mask(config.to_json(), layer, n, str(q.device))
    fn = flex_attention
    if q.is_cuda:
        if _compiled is None:
            _compiled = torch.compile(flex_attention, dynamic=False)
        fn = _compiled
    return fn(q, k, v, block_mask=block_mask, enable_gqa=h != k.shape[1], scale=d**-0.5)
