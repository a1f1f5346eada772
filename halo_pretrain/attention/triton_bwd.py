"""HALO-S attention backward: two deterministic kernels, no atomics.

`halo_bwd_dq_kernel`, one program per (query tile, head), walks the same keys as the forward and writes
dQ, delta = rowsum(dO * O), and each tile's partial dGlobalK / dGlobalV (summed in a fixed order on the
host). `halo_bwd_dkv_kernel`, one program per (key tile, KV head), owns its dK / dV rows and enumerates
every query that reads them, for all heads of the GQA group: the window band as tensor-core tiles; then
extra query columns, one query row per key and column: column j < num_offsets is dilated offset j (the
query k + d), later columns walk the random edges into each key through a CSR inverse (key -> querying
positions, sorted) built once per (length, layer).

With S = QKᵀ·scale and P = softmax(S): dS = P ⊙ (dO Vᵀ − delta); dQ = scale·dS K; dK = scale·dSᵀ Q;
dV = Pᵀ dO. The kernels keep `scale` out of dS and apply it when storing.
"""

import triton
import triton.language as tl

from .triton_common import extra_key_rows, load_cols, load_rows, mix32, mma, window_mask


@triton.jit(do_not_specialize=["key"])
def halo_bwd_dq_kernel(
    Q, K, V, GK, GV, OFFSETS, O, DO, LSE, DELTA, DQ, DGK_PART, DGV_PART,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    N, H, KV, window, num_offsets, num_globals, num_random, key, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr, PREFETCH: tl.constexpr, MMA_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
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

    q_start = q_tile * BLOCK_M
    rows = q_start + tl.arange(0, BLOCK_M)
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

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo = tl.maximum(q_start - window + 1, 0) // BLOCK_N * BLOCK_N
    hi = tl.minimum(q_start + BLOCK_M, N)
    for k_start in range(lo, hi, BLOCK_N):
        cols = k_start + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        k_t = load_cols(k_base, cols, stride_kn, col_ok, offs_d, HEAD_DIM, BLOCK_D)
        v_t = load_cols(v_base, cols, stride_vn, col_ok, offs_d, HEAD_DIM, BLOCK_D)
        s = mma(q, k_t, MMA_DTYPE, DOT_PRECISION) * qk_scale
        p = tl.where(window_mask(rows, cols, window), tl.math.exp2(s - lse[:, None]), 0.0)
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

    # token extras (with PREFETCH, the next column's K and V rows load while this one is used)
    q_f32 = q.to(tl.float32)
    query_hash = mix32(key.to(tl.uint32) ^ rows.to(tl.uint32))
    span = tl.maximum(rows - window + 1, 1).to(tl.uint32)
    if PREFETCH:
        ok_next, k_next, v_next = extra_key_rows(0, rows, row_ok, OFFSETS, num_offsets, num_random, window,
                                                 query_hash, span, k_base, stride_kn, v_base, stride_vn, offs_d,
                                                 HEAD_DIM, BLOCK_D)
    for j in range(num_offsets + num_random):
        if PREFETCH:
            ok, k_rows, v_rows = ok_next, k_next, v_next
            ok_next, k_next, v_next = extra_key_rows(j + 1, rows, row_ok, OFFSETS, num_offsets, num_random, window,
                                                     query_hash, span, k_base, stride_kn, v_base, stride_vn, offs_d,
                                                     HEAD_DIM, BLOCK_D)
        else:
            ok, k_rows, v_rows = extra_key_rows(j, rows, row_ok, OFFSETS, num_offsets, num_random, window,
                                                query_hash, span, k_base, stride_kn, v_base, stride_vn, offs_d,
                                                HEAD_DIM, BLOCK_D)
        k_rows = k_rows.to(tl.float32)
        v_rows = v_rows.to(tl.float32)
        s = tl.sum(q_f32 * k_rows, 1) * qk_scale
        p = tl.where(ok, tl.math.exp2(s - lse), 0.0)
        ds = p * (tl.sum(do_f32 * v_rows, 1) - delta)
        dq += ds[:, None] * k_rows

    dq_ptrs = DQ + bh * N * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :])


@triton.jit
def _extra_queries(j, keys, N, OFFSETS, num_offsets, window, RANDOM_QUERY, random_start, random_count):
    """Query position [M] reading each key of `keys` as extra column j, and whether it does: column
    j < num_offsets is dilated offset j (query k + d), later columns the random edges in CSR order."""
    if j < num_offsets:
        dist = tl.load(OFFSETS + j)
        q_pos = keys + dist
        ok = (q_pos < N) & (q_pos - keys >= window)  # dist >= W, as a vector (see extra_column)
    else:
        edge = j - num_offsets
        ok = edge < random_count
        q_pos = tl.load(RANDOM_QUERY + random_start + edge, mask=ok, other=0)
    return q_pos, ok


@triton.jit
def _extra_query_rows(j, keys, N, OFFSETS, num_offsets, window, RANDOM_QUERY, random_start, random_count,
                      q_base, stride_qn, do_base, lse_base, delta_base, offs_d,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Q rows, dO rows, log-sum-exp and delta of the queries of extra column j; lse = +inf where none (p = 0)."""
    q_pos, ok = _extra_queries(j, keys, N, OFFSETS, num_offsets, window, RANDOM_QUERY, random_start,
                               random_count)
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
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PREFETCH: tl.constexpr, MMA_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    group = H // KV
    k_tile = tl.program_id(0)
    batch = tl.program_id(1) // KV
    kv_head = tl.program_id(1) % KV
    k_base = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh

    k_start = k_tile * BLOCK_N
    keys = k_start + tl.arange(0, BLOCK_N)
    key_ok = keys < N
    offs_d = tl.arange(0, BLOCK_D)
    k = load_rows(k_base, keys, stride_kn, key_ok, offs_d, HEAD_DIM, BLOCK_D)
    v = load_rows(v_base, keys, stride_vn, key_ok, offs_d, HEAD_DIM, BLOCK_D)
    k_f32 = k.to(tl.float32)
    v_f32 = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    # random edges into these keys: RANDOM_QUERY[RANDOM_START[k] : RANDOM_START[k + 1]] (all zero when R = 0)
    random_start = tl.load(RANDOM_START + keys, mask=key_ok, other=0)
    random_count = tl.load(RANDOM_START + keys + 1, mask=key_ok, other=0) - random_start
    num_extra = num_offsets + tl.max(random_count, 0)

    for head_in_group in range(group):
        head = kv_head * group + head_in_group
        bh = (batch * H + head).to(tl.int64)
        q_base = Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
        do_base = DO + bh * N * HEAD_DIM
        lse_base = LSE + bh * N
        delta_base = DELTA + bh * N

        # window: queries k .. k+W-1 for the keys of this tile
        lo = k_start // BLOCK_M * BLOCK_M
        hi = tl.minimum(k_start + BLOCK_N - 1 + window, N)
        for q_start in range(lo, hi, BLOCK_M):
            rows = q_start + tl.arange(0, BLOCK_M)
            row_ok = rows < N
            q = load_rows(q_base, rows, stride_qn, row_ok, offs_d, HEAD_DIM, BLOCK_D)
            do = load_rows(do_base, rows, HEAD_DIM, row_ok, offs_d, HEAD_DIM, BLOCK_D)
            lse = tl.load(lse_base + rows, mask=row_ok, other=float("inf"))
            delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
            s_t = mma(k, tl.trans(q), MMA_DTYPE, DOT_PRECISION) * qk_scale  # [keys, queries]
            in_window = (keys[:, None] <= rows[None, :]) & (keys[:, None] > rows[None, :] - window)
            p_t = tl.where(in_window, tl.math.exp2(s_t - lse[None, :]), 0.0)
            dv += mma(p_t.to(do.dtype), do, MMA_DTYPE, DOT_PRECISION)
            ds_t = p_t * (mma(v, tl.trans(do), MMA_DTYPE, DOT_PRECISION) - delta[None, :])
            dk += mma(ds_t.to(q.dtype), q, MMA_DTYPE, DOT_PRECISION)

        # extra query columns (with PREFETCH, the next column's rows load while this one is used)
        if PREFETCH:
            q_next, do_next, lse_next, delta_next = _extra_query_rows(
                0, keys, N, OFFSETS, num_offsets, window, RANDOM_QUERY, random_start, random_count,
                q_base, stride_qn, do_base, lse_base, delta_base, offs_d, HEAD_DIM, BLOCK_D)
        for j in range(num_extra):
            if PREFETCH:
                q_rows, do_rows, lse, delta = q_next, do_next, lse_next, delta_next
                q_next, do_next, lse_next, delta_next = _extra_query_rows(
                    j + 1, keys, N, OFFSETS, num_offsets, window, RANDOM_QUERY, random_start, random_count,
                    q_base, stride_qn, do_base, lse_base, delta_base, offs_d, HEAD_DIM, BLOCK_D)
            else:
                q_rows, do_rows, lse, delta = _extra_query_rows(
                    j, keys, N, OFFSETS, num_offsets, window, RANDOM_QUERY, random_start, random_count,
                    q_base, stride_qn, do_base, lse_base, delta_base, offs_d, HEAD_DIM, BLOCK_D)
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
