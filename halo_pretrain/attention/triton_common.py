"""Triton device helpers shared by the HALO-S forward and backward kernels.

Scores live in the log2 domain: s = (q . k) * scale * log2(e), so softmax uses exp2.
A query tile's token keys come as square tensor-core tiles ("bands"): first the local window's key
tiles, then one band per dilated offset d, whose keys are the query rows shifted by d (a contiguous
key tile, of which the diagonal is read). One loop walks all bands, so the compiler's pipeliner keeps
the next bands' loads in flight. The global slots are one small extra tile; the random slots are one
gathered key row per query and slot.
"""

import triton
import triton.language as tl


@triton.jit
def mix32(x):
    """neighbors.mix32 on uint32 tensors (multiplication wraps modulo 2**32)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x68E31DA5
    return x ^ (x >> 16)


@triton.jit
def random_target(query_hash, slot, span):
    """Target of random slot `slot`: mix32(mix32(key ^ q) ^ slot) % (q - W + 1), as int32."""
    return (mix32(query_hash ^ slot) % span).to(tl.int32)


@triton.jit
def band_distance(t, num_window_tiles, OFFSETS):
    """Distance of band t: 0 for the window's key tiles (t < num_window_tiles), else dilated offset
    t - num_window_tiles."""
    dist = tl.load(OFFSETS + tl.maximum(t - num_window_tiles, 0))
    return tl.where(t < num_window_tiles, 0, dist)


@triton.jit
def window_key_tiles(q_start, window, N, BLOCK: tl.constexpr):
    """(first key, number of key tiles) covering the window of the query tile at q_start:
    keys q_start-W+1 .. q_start+BLOCK-1, tile-aligned."""
    window_lo = tl.maximum(q_start - window + 1, 0) // BLOCK * BLOCK
    return window_lo, tl.cdiv(tl.minimum(q_start + BLOCK, N) - window_lo, BLOCK)


@triton.jit
def key_band(t, num_window_tiles, window_lo, q_start, OFFSETS, BLOCK: tl.constexpr):
    """(key positions [BLOCK], distance) of band t of the query tile at q_start: the window's key tile
    window_lo + t * BLOCK (distance 0), or rows - d for dilated offset d."""
    dist = band_distance(t, num_window_tiles, OFFSETS)
    return tl.where(dist == 0, window_lo + t * BLOCK, q_start - dist) + tl.arange(0, BLOCK), dist


@triton.jit
def in_band(gap, dist, window):
    """Which pairs of a band, at distances gap = q - k, are in the neighbour set. Window band (dist 0):
    0 <= gap < W. Dilated band: gap = dist, counted only when dist >= W (a shorter offset is a window
    key). The caller masks keys before 0 and queries past N."""
    return tl.where(dist == 0, (gap >= 0) & (gap < window), (gap == dist) & (gap >= window))


@triton.jit
def random_column(slot, rows, row_ok, OFFSETS, num_offsets, window, query_hash, span):
    """Key position [M] of random slot `slot` for query rows, and whether it is in the set.

    Dedup (neighbors.py): a target is dropped when it equals a dilated position (then q - t is an
    offset) or an earlier slot's target. Only queries q >= W have random keys.
    """
    pos = random_target(query_hash, slot, span)
    ok = row_ok & (rows >= window)
    for i in range(num_offsets):
        ok = ok & (rows - pos != tl.load(OFFSETS + i))
    for earlier in range(slot):
        ok = ok & (pos != random_target(query_hash, earlier, span))
    return pos, ok


@triton.jit
def load_rows(base, rows, stride_row, ok, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows `rows` of a [N, HEAD_DIM] matrix as [len(rows), BLOCK_D]; zero where not ok or past HEAD_DIM."""
    ptrs = base + rows[:, None] * stride_row + offs_d[None, :]
    if HEAD_DIM == BLOCK_D:
        return tl.load(ptrs, mask=ok[:, None], other=0.0)
    return tl.load(ptrs, mask=ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)


@triton.jit
def load_cols(base, cols, stride_row, ok, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows `cols` of a [N, HEAD_DIM] matrix, transposed: [BLOCK_D, len(cols)]."""
    ptrs = base + cols[None, :] * stride_row + offs_d[:, None]
    if HEAD_DIM == BLOCK_D:
        return tl.load(ptrs, mask=ok[None, :], other=0.0)
    return tl.load(ptrs, mask=ok[None, :] & (offs_d < HEAD_DIM)[:, None], other=0.0)


@triton.jit
def online_softmax(scores, m_i, l_i):
    """Fold scores [M, X] (log2 domain, -inf where absent) into the running max and sum.

    Returns (m_new, l_new, alpha, p): rescale the accumulator by alpha, then add p @ values.
    A row with no key so far keeps m = -inf; m_safe keeps exp2 away from (-inf) - (-inf).
    """
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(scores - m_safe[:, None])
    return m_new, l_i * alpha + tl.sum(p, 1), alpha, p


@triton.jit
def online_softmax_column(score, m_i, l_i):
    """online_softmax for one key per row: score [M]; returns (m_new, l_new, alpha, p [M])."""
    m_new = tl.maximum(m_i, score)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(score - m_safe)
    return m_new, l_i * alpha + p, alpha, p


@triton.jit
def mma(a, b, MMA_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """a @ b on the tensor cores, fp32 accumulation. MMA_DTYPE is the input dtype, except fp32 for bf16
    under the CPU interpreter (triton 3.9's interpreted dot multiplies bf16 bit patterns as integers)."""
    return tl.dot(a.to(MMA_DTYPE), b.to(MMA_DTYPE), input_precision=DOT_PRECISION)
