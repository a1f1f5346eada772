"""HALO-S attention backward: two deterministic kernels, no atomics.

`halo_bwd_dq_kernel`, one program per (query tile, head), walks the same keys as the forward and writes
dQ, delta = rowsum(dO * O), and each tile's partial dGlobalK / dGlobalV (summed in a fixed order on the
host). `halo_bwd_dkv_kernel`, one program per (key tile, KV head), owns its dK / dV rows and enumerates
every query that reads them, for all heads of the GQA group: the window's query tiles and one shifted
query tile per dilated offset d (the queries k + d, its diagonal) as tensor-core bands; then the random
edges into each key, one query row per key and edge, through a CSR inverse (key -> querying positions,
sorted) built once per (length, layer).

With S = QKᵀ·scale and P = softmax(S): dS = P ⊙ (dO Vᵀ − delta); dQ = scale·dS K; dK = scale·dSᵀ Q;
dV = Pᵀ dO. The kernels keep `scale` out of dS and apply it when storing.
"""

import triton
import triton.language as tl

from .triton_common import (
    band_distance, in_band, key_band, load_cols, load_rows, mix32, mma, random_column, window_key_tiles,
)


@triton.jit(do_not_specialize=["key"])
def halo_bwd_dq_kernel(
    Q, K, V, GK, GV, OFFSETS, O, DO, LSE, DELTA, DQ, DGK_PART, DGV_PART,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    N, H, KV, window, num_offsets, num_globals, num_random, key, qk_scale, scale,
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
    bh = (batch * H + head).to(tl.int64)

    q_base = Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
    k_base = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh

    q_start = q_tile * BLOCK
    rows = q_start + tl.arange(0, BLOCK)
    row_ok = rows < N
    offs_d = tl.arange(0, BLOCK_D)
    q = load_rows(q_base, rows, stride_qn, row_ok, offs_d, HEAD_DIM, BLOCK_D)
    do = load_rows(DO + bh * N * HEAD_DIM, rows, HEAD_DIM, row_ok, offs_d, HEAD_DIM, BLOCK_D)
    o = load_rows(O + bh * N * HEAD_DIM, rows, HEAD_DIM, row_ok, offs_d, HEAD_DIM, BLOCK_D)
    do_f32 = do.to(tl.float32)
    delta = tl.sum(do_f32 * o.to(tl.float32), 1)
    tl.store(DELTA + bh * N + rows, delta, mask=row_ok)
    # +inf makes every probability of a padded row zero
    lse = tl.load(LSE + bh * N + rows, mask=row_ok, other=float("inf"))

    dq = tl.zeros([BLOCK, BLOCK_D], tl.float32)
    window_lo, num_window_tiles = window_key_tiles(q_start, window, N, BLOCK)
    for t in range(num_window_tiles + num_offsets):  # key bands, as in the forward
        cols, dist = key_band(t, num_window_tiles, window_lo, q_start, OFFSETS, BLOCK)
        col_ok = (cols >= 0) & (cols < N)
        k_t = load_cols(k_base, cols, stride_kn, col_ok, offs_d, HEAD_DIM, BLOCK_D)
        v_t = load_cols(v_base, cols, stride_vn, col_ok, offs_d, HEAD_DIM, BLOCK_D)
        s = mma(q, k_t, MMA_DTYPE, DOT_PRECISION) * qk_scale
        in_set = in_band(rows[:, None] - cols[None, :], dist, window) & col_ok[None, :]
        p = tl.where(in_set, tl.math.exp2(s - lse[:, None]), 0.0)
        ds = p * (mma(do, v_t, MMA_DTYPE, DOT_PRECISION) - delta[:, None])
        dq += mma(ds.to(k_t.dtype), tl.trans(k_t), MMA_DTYPE, DOT_PRECISION)

    # global slots: dQ, and this tile's [G, D] share of dGlobalK / dGlobalV
    num_q_tiles = tl.num_programs(0) // group
    part = (bh * num_q_tiles + q_tile) * num_globals * HEAD_DIM
    for g0 in range(0, num_globals, BLOCK_G):
        slots = g0 + tl.arange(0, BLOCK_G)
        slot_ok = slots < num_globals
        g_base = kv_head.to(tl.int64) * num_globals * HEAD_DIM
        gk_t = load_cols(GK + g_base, slots, HEAD_DIM, slot_ok, offs_d, HEAD_DIM, BLOCK_D)
        gv_t = load_cols(GV + g_base, slots, HEAD_DIM, slot_ok, offs_d, HEAD_DIM, BLOCK_D)
        s = mma(q, gk_t, MMA_DTYPE, DOT_PRECISION) * qk_scale
        p = tl.where(slot_ok[None, :], tl.math.exp2(s - lse[:, None]), 0.0)
        ds = p * (mma(do, gv_t, MMA_DTYPE, DOT_PRECISION) - delta[:, None])
        dq += mma(ds.to(gk_t.dtype), tl.trans(gk_t), MMA_DTYPE, DOT_PRECISION)
        part_ptrs = part + slots[:, None] * HEAD_DIM + offs_d[None, :]
        part_mask = slot_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
        d_gk = mma(tl.trans(ds.to(q.dtype)), q, MMA_DTYPE, DOT_PRECISION)
        d_gv = mma(tl.trans(p.to(do.dtype)), do, MMA_DTYPE, DOT_PRECISION)
        tl.store(DGK_PART + part_ptrs, d_gk, mask=part_mask)
        tl.store(DGV_PART + part_ptrs, d_gv, mask=part_mask)

    # random slots: one gathered key row per query and slot
    q_f32 = q.to(tl.float32)
    query_hash = mix32(key.to(tl.uint32) ^ rows.to(tl.uint32))
    span = tl.maximum(rows - window + 1, 1).to(tl.uint32)
    for slot in range(num_random):
        pos, ok = random_column(slot, rows, row_ok, OFFSETS, num_offsets, window, query_hash, span)
        k_rows = load_rows(k_base, pos, stride_kn, ok, offs_d, HEAD_DIM, BLOCK_D).to(tl.float32)
        v_rows = load_rows(v_base, pos, stride_vn, ok, offs_d, HEAD_DIM, BLOCK_D).to(tl.float32)
        s = tl.sum(q_f32 * k_rows, 1) * qk_scale
        p = tl.where(ok, tl.math.exp2(s - lse), 0.0)
        ds = p * (tl.sum(do_f32 * v_rows, 1) - delta)
        dq += ds[:, None] * k_rows

    dq_ptrs = DQ + bh * N * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :])


@triton.jit
def _random_query_rows(edge, keys, key_ok, RANDOM_QUERY, random_start, random_count, q_base, stride_qn, do_base,
                       lse_base, delta_base, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Q rows, dO rows, log-sum-exp and delta of each key's random edge `edge` (CSR order); lse = +inf
    where a key has fewer edges (p = 0)."""
    ok = key_ok & (edge < random_count)
    q_pos = tl.load(RANDOM_QUERY + random_start + edge, mask=ok, other=0)
    q_rows = load_rows(q_base, q_pos, stride_qn, ok, offs_d, HEAD_DIM, BLOCK_D)
    do_rows = load_rows(do_base, q_pos, HEAD_DIM, ok, offs_d, HEAD_DIM, BLOCK_D)
    lse = tl.load(lse_base + q_pos, mask=ok, other=float("inf"))
    delta = tl.load(delta_base + q_pos, mask=ok, other=0.0)
    return q_rows, do_rows, lse, delta


@triton.jit
def halo_bwd_dkv_kernel(
    Q, K, V, DO, LSE, DELTA, OFFSETS, RANDOM_START, RANDOM_QUERY, DK, DV,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    N, H, KV, window, num_offsets, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr,
    MMA_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    group = H // KV
    k_tile = tl.program_id(0)
    batch = tl.program_id(1) // KV
    kv_head = tl.program_id(1) % KV
    k_base = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh

    k_start = k_tile * BLOCK
    keys = k_start + tl.arange(0, BLOCK)
    key_ok = keys < N
    offs_d = tl.arange(0, BLOCK_D)
    k = load_rows(k_base, keys, stride_kn, key_ok, offs_d, HEAD_DIM, BLOCK_D)
    v = load_rows(v_base, keys, stride_vn, key_ok, offs_d, HEAD_DIM, BLOCK_D)
    k_f32 = k.to(tl.float32)
    v_f32 = v.to(tl.float32)
    dk = tl.zeros([BLOCK, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK, BLOCK_D], tl.float32)

    # random edges into these keys: RANDOM_QUERY[RANDOM_START[k] : RANDOM_START[k + 1]] (all zero when R = 0)
    random_start = tl.load(RANDOM_START + keys, mask=key_ok, other=0)
    random_count = tl.load(RANDOM_START + keys + 1, mask=key_ok, other=0) - random_start
    max_random = tl.max(random_count, 0)
    # query bands: the window's query tiles k .. k+W-1, then keys + d per dilated offset d
    window_hi = tl.minimum(k_start + BLOCK - 1 + window, N)
    num_window_tiles = tl.cdiv(window_hi - k_start, BLOCK)

    for head_in_group in range(group):
        head = kv_head * group + head_in_group
        bh = (batch * H + head).to(tl.int64)
        q_base = Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
        do_base = DO + bh * N * HEAD_DIM
        lse_base = LSE + bh * N
        delta_base = DELTA + bh * N

        for t in range(num_window_tiles + num_offsets):
            dist = band_distance(t, num_window_tiles, OFFSETS)
            rows = tl.where(dist == 0, k_start + t * BLOCK, k_start + dist) + tl.arange(0, BLOCK)
            row_ok = rows < N
            q = load_rows(q_base, rows, stride_qn, row_ok, offs_d, HEAD_DIM, BLOCK_D)
            do = load_rows(do_base, rows, HEAD_DIM, row_ok, offs_d, HEAD_DIM, BLOCK_D)
            lse = tl.load(lse_base + rows, mask=row_ok, other=float("inf"))
            delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
            s_t = mma(k, tl.trans(q), MMA_DTYPE, DOT_PRECISION) * qk_scale  # [keys, queries]
            in_set = in_band(rows[None, :] - keys[:, None], dist, window)
            p_t = tl.where(in_set, tl.math.exp2(s_t - lse[None, :]), 0.0)
            dv += mma(p_t.to(do.dtype), do, MMA_DTYPE, DOT_PRECISION)
            ds_t = p_t * (mma(v, tl.trans(do), MMA_DTYPE, DOT_PRECISION) - delta[None, :])
            dk += mma(ds_t.to(q.dtype), q, MMA_DTYPE, DOT_PRECISION)

        for edge in range(max_random):
            q_rows, do_rows, lse, delta = _random_query_rows(
                edge, keys, key_ok, RANDOM_QUERY, random_start, random_count, q_base, stride_qn, do_base,
                lse_base, delta_base, offs_d, HEAD_DIM, BLOCK_D)
            q_rows = q_rows.to(tl.float32)
            do_rows = do_rows.to(tl.float32)
            p = tl.math.exp2(tl.sum(k_f32 * q_rows, 1) * qk_scale - lse)
            ds = p * (tl.sum(v_f32 * do_rows, 1) - delta)
            dk += ds[:, None] * q_rows
            dv += p[:, None] * do_rows

    out = (batch * KV + kv_head).to(tl.int64) * N * HEAD_DIM + keys[:, None] * HEAD_DIM + offs_d[None, :]
    mask = key_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=mask)
