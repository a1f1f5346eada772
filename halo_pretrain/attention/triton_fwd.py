"""HALO-S attention forward: one program per (query tile, head); online softmax over the neighbour set.

Order per tile: the local window as tensor-core tiles over the contiguous key band, then one key per
query row for each global slot, dilated offset and random slot (row gathers). Writes O and the
log-sum-exp (log2 domain) that the backward recomputes probabilities from.
"""

import triton
import triton.language as tl

from .triton_common import (
    load_cols, load_rows, load_vector, mix32, mma, online_softmax_row, random_is_new, random_target, window_mask,
)


@triton.jit(do_not_specialize=["key"])
def halo_fwd_kernel(
    Q, K, V, GK, GV, OFFSETS, O, LSE,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    N, H, KV, window, num_offsets, num_globals, num_random, key, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
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
    gk_base = GK + kv_head.to(tl.int64) * num_globals * HEAD_DIM
    gv_base = GV + kv_head.to(tl.int64) * num_globals * HEAD_DIM

    q_start = q_tile * BLOCK_M
    q_last = q_start + BLOCK_M - 1
    rows = q_start + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    offs_d = tl.arange(0, BLOCK_D)
    q = load_rows(q_base, rows, stride_qn, row_ok, offs_d, HEAD_DIM, BLOCK_D)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # local window: key tiles covering q_start-W+1 .. q_last
    lo = tl.maximum(q_start - window + 1, 0) // BLOCK_N * BLOCK_N
    hi = tl.minimum(q_start + BLOCK_M, N)
    for k_start in range(lo, hi, BLOCK_N):
        cols = k_start + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        k_t = load_cols(k_base, cols, stride_kn, col_ok, offs_d, HEAD_DIM, BLOCK_D)
        s = mma(q, k_t, MMA_DTYPE, DOT_PRECISION) * qk_scale
        s = tl.where(window_mask(rows, cols, window), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = load_rows(v_base, cols, stride_vn, col_ok, offs_d, HEAD_DIM, BLOCK_D)
        acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, MMA_DTYPE, DOT_PRECISION)
        m_i = m_new

    q_f32 = q.to(tl.float32)

    for slot in range(num_globals):
        gk = load_vector(gk_base + slot * HEAD_DIM, offs_d, HEAD_DIM, BLOCK_D)
        gv = load_vector(gv_base + slot * HEAD_DIM, offs_d, HEAD_DIM, BLOCK_D)
        s = tl.sum(q_f32 * gk[None, :], 1) * qk_scale
        m_i, l_i, acc = online_softmax_row(s, gv[None, :], m_i, l_i, acc)

    for i in range(num_offsets):
        dist = tl.load(OFFSETS + i)
        if (dist >= window) & (dist <= q_last):  # offsets below W are window keys
            k_pos = rows - dist
            ok = row_ok & (k_pos >= 0)
            k_rows = load_rows(k_base, k_pos, stride_kn, ok, offs_d, HEAD_DIM, BLOCK_D).to(tl.float32)
            s = tl.where(ok, tl.sum(q_f32 * k_rows, 1) * qk_scale, float("-inf"))
            v_rows = load_rows(v_base, k_pos, stride_vn, ok, offs_d, HEAD_DIM, BLOCK_D).to(tl.float32)
            m_i, l_i, acc = online_softmax_row(s, v_rows, m_i, l_i, acc)

    if (num_random > 0) & (q_last >= window):
        query_hash = mix32(key.to(tl.uint32) ^ rows.to(tl.uint32))
        span = tl.maximum(rows - window + 1, 1).to(tl.uint32)
        for slot in range(num_random):
            target = random_target(query_hash, slot, span)
            ok = random_is_new(row_ok & (rows >= window), rows, target, slot, query_hash, span,
                               OFFSETS, num_offsets)
            k_rows = load_rows(k_base, target, stride_kn, ok, offs_d, HEAD_DIM, BLOCK_D).to(tl.float32)
            s = tl.where(ok, tl.sum(q_f32 * k_rows, 1) * qk_scale, float("-inf"))
            v_rows = load_rows(v_base, target, stride_vn, ok, offs_d, HEAD_DIM, BLOCK_D).to(tl.float32)
            m_i, l_i, acc = online_softmax_row(s, v_rows, m_i, l_i, acc)

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
