"""HALO-S attention forward: one program per (query tile, head); online softmax over the neighbour set.

Per tile: the key bands (the local window's tiles, then one shifted tile per dilated offset, masked to
its diagonal) on the tensor cores in one pipelined loop; the global slots as one tensor-core tile; then
the random slots, one gathered K row and V row per query and slot. Writes O and the log-sum-exp (log2
domain) that the backward recomputes probabilities from.
"""

import triton
import triton.language as tl

from .triton_common import (
    in_band, key_band, load_cols, load_rows, mix32, mma, online_softmax, online_softmax_column, random_column,
    window_key_tiles,
)


@triton.jit(do_not_specialize=["key"])
def halo_fwd_kernel(
    Q, K, V, GK, GV, OFFSETS, O, LSE,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    N, H, KV, window, num_offsets, num_globals, num_random, key, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, BLOCK_G: tl.constexpr,
    MMA_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    group = H // KV
    pid = tl.program_id(0)
    head_in_group = pid % group
    q_tile = pid // group
    batch = tl.program_id(1) // KV
    kv_head = tl.program_id(1) % KV
    head = kv_head * group + head_in_group

    q_base = Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
    k_base = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh

    q_start = q_tile * BLOCK
    rows = q_start + tl.arange(0, BLOCK)
    row_ok = rows < N
    offs_d = tl.arange(0, BLOCK_D)
    q = load_rows(q_base, rows, stride_qn, row_ok, offs_d, HEAD_DIM, BLOCK_D)

    m_i = tl.full([BLOCK], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK], tl.float32)
    acc = tl.zeros([BLOCK, BLOCK_D], tl.float32)

    # key bands: window tiles covering q_start-W+1 .. q_start+BLOCK-1, then rows - d per dilated offset d
    window_lo, num_window_tiles = window_key_tiles(q_start, window, N, BLOCK)
    for t in range(num_window_tiles + num_offsets):
        cols, dist = key_band(t, num_window_tiles, window_lo, q_start, OFFSETS, BLOCK)
        col_ok = (cols >= 0) & (cols < N)
        k_t = load_cols(k_base, cols, stride_kn, col_ok, offs_d, HEAD_DIM, BLOCK_D)
        v = load_rows(v_base, cols, stride_vn, col_ok, offs_d, HEAD_DIM, BLOCK_D)
        s = mma(q, k_t, MMA_DTYPE, DOT_PRECISION) * qk_scale
        s = tl.where(in_band(rows[:, None] - cols[None, :], dist, window) & col_ok[None, :], s, float("-inf"))
        m_i, l_i, alpha, p = online_softmax(s, m_i, l_i)
        acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, MMA_DTYPE, DOT_PRECISION)

    # global slots: one [BLOCK_G] key tile shared by all queries (a loop of one step when G > 0)
    for g0 in range(0, num_globals, BLOCK_G):
        slots = g0 + tl.arange(0, BLOCK_G)
        slot_ok = slots < num_globals
        g_base = kv_head.to(tl.int64) * num_globals * HEAD_DIM
        gk_t = load_cols(GK + g_base, slots, HEAD_DIM, slot_ok, offs_d, HEAD_DIM, BLOCK_D)
        gv = load_rows(GV + g_base, slots, HEAD_DIM, slot_ok, offs_d, HEAD_DIM, BLOCK_D)
        s = mma(q, gk_t, MMA_DTYPE, DOT_PRECISION) * qk_scale
        s = tl.where(slot_ok[None, :], s, float("-inf"))
        m_i, l_i, alpha, p = online_softmax(s, m_i, l_i)
        acc = acc * alpha[:, None] + mma(p.to(gv.dtype), gv, MMA_DTYPE, DOT_PRECISION)

    # random slots: one gathered key row per query and slot
    q_f32 = q.to(tl.float32)
    query_hash = mix32(key.to(tl.uint32) ^ rows.to(tl.uint32))
    span = tl.maximum(rows - window + 1, 1).to(tl.uint32)
    for slot in range(num_random):
        pos, ok = random_column(slot, rows, row_ok, OFFSETS, num_offsets, window, query_hash, span)
        k_rows = load_rows(k_base, pos, stride_kn, ok, offs_d, HEAD_DIM, BLOCK_D)
        v_rows = load_rows(v_base, pos, stride_vn, ok, offs_d, HEAD_DIM, BLOCK_D)
        s = tl.where(ok, tl.sum(q_f32 * k_rows.to(tl.float32), 1) * qk_scale, float("-inf"))
        m_i, l_i, alpha, p = online_softmax_column(s, m_i, l_i)
        acc = acc * alpha[:, None] + p[:, None] * v_rows.to(tl.float32)

    # every real row holds at least its own key, so l_i > 0 there; padded rows are not stored
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    o_base = O + (batch * H + head).to(tl.int64) * N * HEAD_DIM
    o_ptrs = o_base + rows[:, None] * HEAD_DIM + offs_d[None, :]
    if HEAD_DIM == BLOCK_D:
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])
    else:
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :])
    lse = m_i + tl.math.log2(l_safe)
    tl.store(LSE + (batch * H + head).to(tl.int64) * N + rows, lse, mask=row_ok)
