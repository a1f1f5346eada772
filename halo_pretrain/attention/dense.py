"""Dense baseline: full causal attention through SDPA (FlashAttention / cuDNN on GPU).

The global slots stay, so the dense model has exactly the HALO-S model's parameters: they are
prepended as G extra keys, with G zero query rows in front so that the square causal mask lets
every real query see all of them. Their outputs are dropped.
"""

import torch
import torch.nn.functional as F

from ..config import HaloConfig


def dense_attention(q, k, v, global_k, global_v, config: HaloConfig, layer: int):
    b, h, n, d = q.shape
    g = global_k.shape[1]
    if g:
        k = torch.cat([global_k[None].expand(b, -1, -1, -1), k], dim=2)
        v = torch.cat([global_v[None].expand(b, -1, -1, -1), v], dim=2)
        q = torch.cat([q.new_zeros(b, h, g, d), q], dim=2)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=h != k.shape[1])
    return out[:, :, g:]
