"""Triton device helpers shared by the HALO-S forward and backward kernels.

Scores live in the log2 domain: s = (q . k) * scale * log2(e), so softmax uses exp2.
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
def random_is_new(ok, rows, target, slot, query_hash, span, OFFSETS, num_offsets):
    """`ok` and the dedup rule of a random slot: its target is no dilated position, no earlier slot's target.

    A target t <= q - W equals a dilated position q - d exactly when q - t == d (then d >= W and d <= q).
    """
    for i in range(num_offsets):
        ok = ok & (rows - target != tl.load(OFFSETS + i))
    for earlier in range(slot):
        ok = ok & (target != random_target(query_hash, earlier, span))
    return ok


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
def load_vector(ptr, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """One [HEAD_DIM] row (a global slot) as fp32 [BLOCK_D]."""
    if HEAD_DIM == BLOCK_D:
        return tl.load(ptr + offs_d).to(tl.float32)
    return tl.load(ptr + offs_d, mask=offs_d < HEAD_DIM, other=0.0).to(tl.float32)


@triton.jit
def window_mask(q_pos, k_pos, window):
    """[len(q_pos), len(k_pos)]: k in q-W+1..q."""
    return (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] > q_pos[:, None] - window)


@triton.jit
def online_softmax_row(score, value_rows, m_i, l_i, acc):
    """Fold one key per query row: score [M] (log2 domain, -inf where absent), value_rows [M or 1, D] fp32."""
    m_new = tl.maximum(m_i, score)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(score - m_safe)
    return m_new, l_i * alpha + p, acc * alpha[:, None] + p[:, None] * value_rows


@triton.jit
def mma(a, b, MMA_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """a @ b on the tensor cores, fp32 accumulation. MMA_DTYPE is the input dtype, except fp32 for bf16
    under the CPU interpreter (triton 3.9's interpreted dot multiplies bf16 bit patterns as integers)."""
    return tl.dot(a.to(MMA_DTYPE), b.to(MMA_DTYPE), input_precision=DOT_PRECISION)
