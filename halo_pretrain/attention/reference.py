"""The definition: a dense boolean mask over token keys, the global slots prepended. Any dtype, float64 too."""

import torch

from ..config import HaloConfig
from .neighbors import token_mask


def reference_attention(q, k, v, global_k, global_v, config: HaloConfig, layer: int):
    """q [B, H, N, D]; k, v [B, KV, N, D]; global_k, global_v [KV, G, D] -> [B, H, N, D]."""
    n, d = q.shape[2], q.shape[3]
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    gk, gv = global_k.repeat_interleave(group, 0), global_v.repeat_interleave(group, 0)
    scale = d**-0.5
    tok = (q @ k.transpose(-1, -2)) * scale
    tok = tok.masked_fill(~token_mask(n, config, layer, device=q.device), float("-inf"))
    glb = torch.einsum("bhnd,hgd->bhng", q, gk) * scale
    p = torch.softmax(torch.cat([glb, tok], dim=-1), dim=-1)
    g = gk.shape[1]
    return torch.einsum("bhng,hgd->bhnd", p[..., :g], gv) + p[..., g:] @ v
