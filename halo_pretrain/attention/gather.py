"""Gather backend: each query reads its K neighbour rows; memory O(N·K), no N×N tensor. CPU-friendly."""

import torch

from ..config import HaloConfig
from .neighbors import neighbor_index


def gather_attention(q, k, v, global_k, global_v, config: HaloConfig, layer: int):
    """Same arguments and result as `reference_attention`."""
    b, h, n, d = q.shape
    kv = k.shape[1]
    index, valid = neighbor_index(n, config, layer, device=q.device)  # [N, K]
    qg = q.view(b, kv, h // kv, n, d)
    k_rows, v_rows = k[:, :, index], v[:, :, index]  # [B, KV, N, K, D]
    scale = d**-0.5
    tok = torch.einsum("bcgnd,bcnkd->bcgnk", qg, k_rows) * scale
    tok = tok.masked_fill(~valid, float("-inf"))
    glb = torch.einsum("bcgnd,cjd->bcgnj", qg, global_k) * scale
    p = torch.softmax(torch.cat([glb, tok], dim=-1), dim=-1)
    g = global_k.shape[1]
    out = torch.einsum("bcgnj,cjd->bcgnd", p[..., :g], global_v)
    out = out + torch.einsum("bcgnk,bcnkd->bcgnd", p[..., g:], v_rows)
    return out.reshape(b, h, n, d)
