"""Gather backend: each query reads its K neighbour rows; memory O(N·K), no N×N tensor. CPU-friendly."""

import torch

from ..config import HaloConfig
from .neighbors import neighbor_index


def gather_attention(q, k, v, global_k, global_v, config: HaloConfig, layer: int):
    """Same arguments and result as `reference_attention`."""
    b, h, n, d = q.shape
    kv = k.shape[1]
    index, valid = neighbor_index(n, config, layer, device=q.device)  # [N, K]
    out = attend_gathered(q.view(b, kv, h // kv, n, d), k[:, :, index], v[:, :, index], valid, global_k, global_v)
    return out.reshape(b, h, n, d)


def attend_gathered(q, k_rows, v_rows, valid, global_k, global_v):
    """Softmax attention of each query over its gathered key rows and the global slots.

    q [B, KV, G, N, D] (G query heads per KV head); k_rows, v_rows [B, KV, N, K, D]; valid (which of the K
    rows are keys) broadcasts to [B, KV, G, N, K]; global_k, global_v [KV, S, D] -> [B, KV, G, N, D].
    """
    scale = q.shape[-1] ** -0.5
    tok = torch.einsum("bcgnd,bcnkd->bcgnk", q, k_rows) * scale
    tok = tok.masked_fill(~valid, float("-inf"))
    glb = torch.einsum("bcgnd,cjd->bcgnj", q, global_k) * scale
    p = torch.softmax(torch.cat([glb, tok], dim=-1), dim=-1)
    s = global_k.shape[1]
    out = torch.einsum("bcgnj,cjd->bcgnd", p[..., :s], global_v)
    return out + torch.einsum("bcgnk,bcnkd->bcgnd", p[..., s:], v_rows)
