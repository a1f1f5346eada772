"""The GPU suite's kernel checks: the compiled Triton backend against the float64 reference (the contract's
dense-mask definition) at N >= 8,192 on a CUDA GPU, fp32 and bf16, output and all five gradients, GQA,
head_dim 64 and 128, fresh random inputs per case; and two runs bit for bit. The CPU interpreter tests
(tests/test_triton_attention.py) cover small N. Run with `python -m pytest -q -m gpu`."""

from __future__ import annotations

import pytest
import torch

from halo_pretrain.attention.reference import reference_attention
from halo_pretrain.config import HaloConfig

pytestmark = pytest.mark.gpu
LAYER = 5

CASES = {  # name: (N, heads, KV heads, head_dim, dtype, batch, tolerance on ‖got − want‖ / ‖want‖)
    "fp32-n8192-d64-gqa2": (8192, 4, 2, 64, torch.float32, 1, 1e-5),
    "fp32-n8201-d128-gqa4": (8201, 4, 1, 128, torch.float32, 1, 1e-5),
    "bf16-n8192-d128-gqa2-batch2": (8192, 4, 2, 128, torch.bfloat16, 2, 1e-2),
    "bf16-n9001-d64-gqa4": (9001, 4, 1, 64, torch.bfloat16, 1, 1e-2),
}


def make_case(n, heads, kv_heads, head_dim, batch, seed):
    """The contract's default pattern at this size (G=4, W=64, R=2, dilated 2W, 4W, ...) and random leaves."""
    config = HaloConfig(hidden_size=heads * head_dim, num_heads=heads, num_kv_heads=kv_heads, max_seq_len=n,
                        seed=seed)
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float64) * scale

    g = config.num_globals
    leaves = (rand(batch, heads, n, head_dim, scale=1.5), rand(batch, kv_heads, n, head_dim),
              rand(batch, kv_heads, n, head_dim), rand(kv_heads, g, head_dim), rand(kv_heads, g, head_dim))
    return config, leaves, rand(batch, heads, n, head_dim)


def forward_backward(fn, leaves, dout, config):
    xs = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*xs, config, LAYER)
    return out.detach(), torch.autograd.grad(out, xs, dout)


def rel(got, want) -> float:
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("case", list(CASES))
def test_triton_matches_the_float64_reference(case):
    from halo_pretrain.attention.triton_kernel import triton_attention

    n, heads, kv_heads, head_dim, dtype, batch, tol = CASES[case]
    config, leaves, dout = make_case(n, heads, kv_heads, head_dim, batch, seed=sum(map(ord, case)))
    rounded = [t.to(dtype) for t in leaves]  # the reference sees the kernel's rounded inputs, in float64
    want, want_grads = forward_backward(reference_attention, [t.double() for t in rounded], dout.to(dtype).double(),
                                        config)
    got, grads = forward_backward(triton_attention, rounded, dout.to(dtype), config)
    assert got.dtype == dtype and got.shape == want.shape
    errors = {"out": rel(got, want)}
    for name, g, w in zip(("dq", "dk", "dv", "dglobal_k", "dglobal_v"), grads, want_grads):
        assert g.shape == w.shape and g.dtype == dtype
        assert torch.isfinite(g).all(), name
        errors[name] = rel(g, w)
    assert all(e <= tol for e in errors.values()), f"{case}: relative errors over {tol}: {errors}"


def test_two_runs_are_bit_identical():
    from halo_pretrain.attention.triton_kernel import triton_attention

    config, leaves, dout = make_case(16384, 8, 2, 128, 1, seed=3)
    leaves, dout = [t.to(torch.bfloat16) for t in leaves], dout.to(torch.bfloat16)
    first = forward_backward(triton_attention, leaves, dout, config)
    second = forward_backward(triton_attention, leaves, dout, config)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1]))
