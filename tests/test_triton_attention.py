"""The Triton backend against the float64 dense-mask reference, on CPU under TRITON_INTERPRET=1.

Small sizes with 16-wide tiles, so short sequences still span several query and key tiles. The same
kernels run at large N on the GPU through benchmarks/gpu_check_attention.py.
"""

import os
import zlib

import pytest
import torch

from halo_pretrain.attention import halo_attention, resolve_backend
from halo_pretrain.attention import triton_kernel as tk
from halo_pretrain.attention.reference import reference_attention
from halo_pretrain.config import HaloConfig

# conftest.py sets TRITON_INTERPRET=1 before triton is first imported, so these kernels are interpreted;
# a GPU session (-m gpu) compiles them instead, and runs tests/test_gpu_attention.py
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="a CPU-interpreter test")
LAYER = 3


def make_config(h=2, kv=1, d=16, g=3, w=8, offsets=(3, 8, 20, 45), r=2, seed=11, max_seq_len=256):
    return HaloConfig(hidden_size=h * d, num_heads=h, num_kv_heads=kv, num_globals=g, local_window=w,
                      dilated_offsets=None if offsets is None else list(offsets), num_random=r,
                      max_seq_len=max_seq_len, seed=seed)


def make_inputs(config, n, b=1, seed=0):
    """Fresh random float64 leaves (q, k, v, global_k, global_v) and an upstream gradient."""
    gen = torch.Generator().manual_seed(seed)
    h, kv, d, g = config.num_heads, config.num_kv_heads, config.head_dim, config.num_globals

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).requires_grad_()

    leaves = (rand(b, h, n, d, scale=1.5), rand(b, kv, n, d), rand(b, kv, n, d), rand(kv, g, d), rand(kv, g, d))
    return leaves, torch.randn(b, h, n, d, generator=gen, dtype=torch.float64)


def rel_err(got, want):
    want = want.double()
    denom = want.norm().clamp_min(1e-30)
    return ((got.double() - want).norm() / denom).item()


def run_triton(leaves, dout, config, dtype):
    xs = [t.detach().to(dtype).requires_grad_() for t in leaves]
    out = tk.triton_attention(*xs, config, LAYER)
    grads = torch.autograd.grad(out, xs, dout.to(dtype))
    return out, grads


def check_against_reference(config, n, dtype, b=1, seed=0, tol=None):
    tol = tol or {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}[dtype]
    leaves, dout = make_inputs(config, n, b=b, seed=seed)
    # the reference sees the same rounded inputs as the kernel, in float64
    rounded = [t.detach().to(dtype).double().requires_grad_() for t in leaves]
    ref = reference_attention(*rounded, config, LAYER)
    ref_grads = torch.autograd.grad(ref, rounded, dout.to(dtype).double())
    out, grads = run_triton(leaves, dout, config, dtype)
    assert out.dtype == dtype and out.shape == ref.shape
    errors = {"out": rel_err(out, ref)}
    for name, got, want in zip(("dq", "dk", "dv", "dglobal_k", "dglobal_v"), grads, ref_grads):
        assert got.shape == want.shape and got.dtype == dtype
        if want.numel():
            errors[name] = rel_err(got, want)
    assert all(e <= tol for e in errors.values()), f"relative errors over {tol}: {errors}"
    return errors


FP32_CASES = {
    # name: (config kwargs, n, batch)
    "gqa2_globals_random": (dict(), 77, 1),
    "mha_no_globals_no_random_auto_offsets": (
        dict(h=2, kv=2, d=32, g=0, w=5, offsets=None, r=0, max_seq_len=64), 45, 2),
    "gqa4_window_wider_than_tiles": (dict(h=4, kv=1, g=1, w=34, offsets=(7, 80, 100), r=3), 130, 1),
    "many_random_slots_dedup": (dict(h=1, kv=1, g=2, w=4, offsets=(1, 2, 4, 6, 9, 12, 17), r=6), 61, 1),
    "window_of_one": (dict(h=2, kv=2, g=1, w=1, offsets=(1, 2, 5), r=2), 37, 1),
    "shorter_than_window": (dict(h=2, kv=1, g=2, w=32, offsets=(40,), r=2), 19, 1),
    "single_token": (dict(h=2, kv=1, g=2, w=8, r=2), 1, 2),
    "head_dim_24_padded": (dict(h=2, kv=1, d=24, g=2, w=6, offsets=(6, 13), r=2), 50, 1),
    "gqa3_batch2": (dict(h=6, kv=2, g=2, w=8, offsets=(9, 20), r=2), 70, 2),
}


@pytest.mark.parametrize("case", list(FP32_CASES))
def test_fp32_matches_reference(case):
    kwargs, n, b = FP32_CASES[case]
    check_against_reference(make_config(**kwargs), n, torch.float32, b=b, seed=zlib.crc32(case.encode()) % 1000)


@pytest.mark.parametrize("dtype,d,n,kv", [(torch.bfloat16, 64, 70, 1), (torch.bfloat16, 128, 40, 2),
                                          (torch.float16, 32, 90, 1)])
def test_half_precision_matches_reference(dtype, d, n, kv):
    config = make_config(h=2, kv=kv, d=d, g=2, w=8, offsets=(4, 9, 30), r=2)
    check_against_reference(config, n, dtype, seed=d + n)


@pytest.mark.parametrize("block,stages", [(32, 1), (16, 3)])
def test_tile_sizes_and_pipelined_bands(monkeypatch, block, stages):
    """Tiles wider than the window and than some offsets; bands loaded ahead (num_stages) or in place."""
    for kernel in ("fwd", "dq", "dkv"):
        monkeypatch.setitem(tk.TILE_OVERRIDES, (kernel, 16, torch.float32), (block, 1, stages))
    check_against_reference(make_config(w=18, offsets=(5, 21, 50), r=2), 83, torch.float32, seed=7)


def test_strided_inputs_from_sequence_major_layout():
    """q, k, v as [B, N, H, D] tensors viewed as [B, H, N, D] (what a fused QKV projection gives)."""
    config = make_config(h=2, kv=1, g=2)
    leaves, dout = make_inputs(config, 52, b=2, seed=5)
    ref = reference_attention(*leaves, config, LAYER)
    ref_grads = torch.autograd.grad(ref, leaves, dout)
    seq_major = [t.detach().float().transpose(1, 2).contiguous().requires_grad_() for t in leaves[:3]]
    globals_ = [t.detach().float().requires_grad_() for t in leaves[3:]]
    views = [t.transpose(1, 2) for t in seq_major]
    assert not views[0].is_contiguous()
    out = tk.triton_attention(*views, *globals_, config, LAYER)
    grads = torch.autograd.grad(out, seq_major + globals_, dout.float())
    assert rel_err(out, ref) <= 1e-5
    for got, want in zip(grads[:3], ref_grads[:3]):
        assert rel_err(got.transpose(1, 2), want) <= 1e-5
    for got, want in zip(grads[3:], ref_grads[3:]):
        assert rel_err(got, want) <= 1e-5


def test_two_runs_are_bit_identical():
    config = make_config(h=2, kv=1, g=2, w=8, offsets=(3, 10, 25), r=2)
    leaves, dout = make_inputs(config, 50, seed=3)
    out1, grads1 = run_triton(leaves, dout, config, torch.float32)
    out2, grads2 = run_triton(leaves, dout, config, torch.float32)
    assert torch.equal(out1, out2)
    assert all(torch.equal(a, b) for a, b in zip(grads1, grads2))


def test_prefix_consistent():
    """The output at q never depends on N: a prefix run reproduces the full run's first rows."""
    config = make_config(h=2, kv=1, g=2, w=6, offsets=(2, 7, 19), r=2)
    leaves, _ = make_inputs(config, 64, seed=9)
    x = [t.detach().float() for t in leaves]
    full = tk.triton_attention(*x, config, LAYER)
    m = 37
    prefix = tk.triton_attention(x[0][:, :, :m], x[1][:, :, :m], x[2][:, :, :m], x[3], x[4], config, LAYER)
    torch.testing.assert_close(prefix, full[:, :, :m], rtol=1e-6, atol=1e-6)


def test_layers_draw_different_random_edges():
    config = make_config(h=1, kv=1, g=0, w=4, offsets=(), r=2)
    leaves, _ = make_inputs(config, 60, seed=4)
    x = [t.detach().float() for t in leaves]
    out3 = tk.triton_attention(*x, config, 3)
    out4 = tk.triton_attention(*x, config, 4)
    torch.testing.assert_close(out4, reference_attention(*x, config, 4), rtol=1e-5, atol=1e-5)
    assert (out3 - out4).abs().max() > 1e-3


def test_random_inverse_lists_each_random_edge_once():
    from halo_pretrain.attention.neighbors import neighbor_index

    config = make_config(w=4, offsets=(1, 2, 4, 6, 9), r=5)
    n, key = 90, tk.layer_key(config.seed, LAYER)
    start, queries = tk.random_inverse(n, config.local_window, tuple(config.offsets), config.num_random, key,
                                       torch.device("cpu"))
    index, valid = neighbor_index(n, config, LAYER)
    random_cols = slice(index.shape[1] - config.num_random, None)
    want = sorted((int(t), int(q)) for q, row in enumerate(index[:, random_cols].tolist())
                  for t, ok in zip(row, valid[q, random_cols].tolist()) if ok)
    got = sorted((t, int(q)) for t in range(n) for q in queries[start[t]:start[t + 1]].tolist())
    assert got == want and len(want) > n  # many edges, each once


def test_dispatch_selects_triton_under_the_interpreter():
    config = make_config(h=2, kv=1, g=1)
    config.attention = "triton"
    leaves, _ = make_inputs(config, 33, seed=2)
    x = [t.detach().float() for t in leaves]
    assert resolve_backend("triton", "cpu") == "triton"
    out = halo_attention(*x, config, LAYER)
    torch.testing.assert_close(out, reference_attention(*x, config, LAYER), rtol=1e-5, atol=1e-5)


def test_torch_compile_traces_the_custom_op():
    config = make_config(h=2, kv=1, g=2)
    leaves, dout = make_inputs(config, 40, seed=6)

    def f(q, k, v, gk, gv):
        return tk.triton_attention(q * 1.0, k, v, gk, gv, config, LAYER) * 2.0

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm

    xs = [t.detach().float().requires_grad_() for t in leaves]
    torch.compile(f, backend=capture, fullgraph=True)(*xs)
    assert "halo_pretrain.attention" in graphs[0]  # one graph, the op inside it

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)  # traces the fake and autograd impls
    eager_out = f(*xs)
    eager_grads = torch.autograd.grad(eager_out, xs, dout.float())
    out = compiled(*xs)
    grads = torch.autograd.grad(out, xs, dout.float())
    assert torch.equal(out, eager_out)
    assert all(torch.equal(a, b) for a, b in zip(grads, eager_grads))


def test_custom_op_and_eager_function_agree_bitwise():
    """torch.compile runs the registered op (halo_pretrain::attention), eager mode an autograd.Function.
    Both call the same kernels, so their agreement alone proves little: the op's own plumbing (schema, fake
    implementations, autograd registration, which saved tensor and gradient goes where) is checked by
    torch.library.opcheck, and the op's output and every gradient against the float64 reference."""
    config = make_config(h=2, kv=1, g=2)
    leaves, dout = make_inputs(config, 38, seed=12)
    xs = [t.detach().float().requires_grad_() for t in leaves]
    pattern = (config.local_window, list(config.offsets), config.num_random, tk.layer_key(config.seed, LAYER))
    # the fake implementations against the real ones, and autograd registered for the op (its traced use
    # under compile is test_torch_compile_traces_the_custom_op)
    torch.library.opcheck(tk.attention_op, (*xs, *pattern),
                          test_utils=("test_autograd_registration", "test_faketensor"))
    op_out, lse = torch.ops.halo_pretrain.attention(*xs, *pattern)
    plain = [t.detach() for t in xs]
    torch.library.opcheck(tk.attention_backward_op, (dout.float(), *plain, op_out.detach(), lse.detach(), *pattern),
                          test_utils=("test_faketensor",))
    op_grads = torch.autograd.grad(op_out, xs, dout.float())
    eager = tk.triton_attention(*xs, config, LAYER)
    eager_grads = torch.autograd.grad(eager, xs, dout.float())
    assert torch.equal(op_out, eager)
    assert all(torch.equal(a, b) for a, b in zip(op_grads, eager_grads))
    rounded = [t.detach().double().requires_grad_() for t in xs]
    ref = reference_attention(*rounded, config, LAYER)
    ref_grads = torch.autograd.grad(ref, rounded, dout.float().double())
    errors = {"out": rel_err(op_out, ref)}
    errors.update({name: rel_err(got, want) for name, got, want in
                   zip(("dq", "dk", "dv", "dglobal_k", "dglobal_v"), op_grads, ref_grads)})
    assert all(e <= 1e-5 for e in errors.values()), errors


def test_activation_checkpointing_recomputes_identically():
    from torch.utils.checkpoint import checkpoint

    config = make_config(h=2, kv=1, g=2)
    leaves, dout = make_inputs(config, 45, seed=8)
    xs = [t.detach().float().requires_grad_() for t in leaves]

    def f(*args):
        return tk.triton_attention(*args, config, LAYER)

    plain = torch.autograd.grad(f(*xs), xs, dout.float())
    out = checkpoint(f, *xs, use_reentrant=False)
    recomputed = torch.autograd.grad(out, xs, dout.float())
    assert all(torch.equal(a, b) for a, b in zip(plain, recomputed))


@pytest.mark.parametrize("layers", [2, 4])
def test_compiled_model_is_one_graph_whatever_the_depth(layers):
    """The whole model and its loss trace as one main graph: no break per layer (an import inside the forward
    once split the Triton path at every layer), and RoPE's cos/sin stay outside it (inductor fused them
    into every layer's RoPE kernel). The only breaks: check_input's host sync and the RoPE tables."""
    from halo_pretrain.attention import get_attention_fn
    from halo_pretrain.model import HaloSModel

    config = HaloConfig(hidden_size=32, num_layers=layers, num_heads=2, num_kv_heads=1, num_globals=2,
                        local_window=8, max_seq_len=64, vocab_size=97, attention="triton")
    model = HaloSModel(config)
    get_attention_fn(resolve_backend("triton", "cpu"))  # as train.compile does before compiling
    x = torch.randint(0, 97, (1, 41))
    explained = torch._dynamo.explain(model)(x[:, :-1], labels=x[:, 1:], return_logits=False)
    assert explained.graph_break_count == 2, [b.reason for b in explained.break_reasons]
    main = max(explained.graphs, key=lambda g: len(g.graph.nodes))
    calls = [str(n.target) for n in main.graph.nodes if n.op in ("call_function", "call_method")]
    assert sum("halo_pretrain.attention" in c for c in calls) == layers
    assert not any(c.endswith("cos") or c.endswith("sin") for c in calls)
    assert any("cross_entropy" in c for c in calls)


def test_bad_inputs_raise_value_errors(monkeypatch):
    config = make_config(h=2, kv=1, d=16, g=1)
    q, k, v, gk, gv = [t.detach().float() for t in make_inputs(config, 20)[0]]
    with pytest.raises(ValueError, match="head_dim=160"):
        big = torch.randn(1, 2, 20, 160)
        tk.triton_attention(big, big[:, :1], big[:, :1], torch.randn(1, 1, 160), torch.randn(1, 1, 160),
                            config, LAYER)
    with pytest.raises(ValueError, match="dtype=torch.float64"):
        tk.triton_attention(q.double(), k.double(), v.double(), gk, gv, config, LAYER)
    with pytest.raises(ValueError, match="k.dtype"):
        tk.triton_attention(q, k.half(), v, gk, gv, config, LAYER)
    with pytest.raises(ValueError, match="num_heads=2 must be a multiple of num_kv_heads=3"):
        tk.triton_attention(q, k.expand(1, 3, 20, 16), v.expand(1, 3, 20, 16), gk.expand(3, 1, 16),
                            gv.expand(3, 1, 16), config, LAYER)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="device=cpu"):
        tk.triton_attention(q, k, v, gk, gv, config, LAYER)
