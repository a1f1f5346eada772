"""GPU correctness of the Triton HALO-S kernel at large N (the CPU tests cover small N in the interpreter).

    python benchmarks/gpu_check_attention.py --out results/     # writes gpu_check_attention.json there

Checks, each on fresh random inputs, output and the five gradients by ‖got − want‖ / ‖want‖:
  fp32 vs float64 gather (N=4099)                              <= 1e-5
  bf16 vs fp32 gather on the same rounded inputs (N=16411)    <= 1e-2, head_dim 64 and 128, GQA 4
  bf16 vs fp32 FlexAttention with the full mask (N=65521)      <= 1e-2
  two runs bit-identical (N=16384); torch.compile (inductor, fullgraph) equal to eager
  1M tokens (B=1, H=16, head_dim 64) forward+backward: time and peak memory
Exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from attention import environment, make_config, make_inputs  # noqa: E402

from halo_pretrain.attention.gather import gather_attention  # noqa: E402
from halo_pretrain.attention.triton_kernel import triton_attention  # noqa: E402

LAYER = 5


def rel(got, want) -> float:
    want = want.double()
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()


def fwd_bwd(fn, leaves, dout, config):
    xs = [t.detach().requires_grad_() for t in leaves]
    out = fn(*xs, config, LAYER)
    grads = torch.autograd.grad(out, xs, dout.to(out.dtype))
    return out, grads


def compare(name, fn, want_fn, config, n, dtype, want_dtype, tol, batch=1):
    x = make_inputs(config, n, batch, dtype, requires_grad=False, seed=n)
    dout = torch.randn(batch, config.num_heads, n, config.head_dim, device="cuda", dtype=dtype)
    out, grads = fwd_bwd(fn, x, dout, config)
    del fn
    want, want_grads = fwd_bwd(want_fn, [t.to(want_dtype) for t in x], dout.to(want_dtype), config)
    errors = {"out": rel(out, want)}
    for gname, g, w in zip(("dq", "dk", "dv", "dglobal_k", "dglobal_v"), grads, want_grads):
        errors[gname] = rel(g, w)
    ok = all(e <= tol for e in errors.values())
    print(f"{'ok  ' if ok else 'FAIL'} {name}: " + " ".join(f"{k}={v:.2e}" for k, v in errors.items()), flush=True)
    torch.cuda.empty_cache()
    return {"check": name, "ok": ok, "tol": tol, "errors": errors}


def flex_reference(q, k, v, gk, gv, config, layer):
    from halo_pretrain.attention.flex import flex_attention_halo

    return flex_attention_halo(q, k, v, gk, gv, config, layer)


def check_determinism(n=16384):
    config = make_config(n, 8, 2, 64)
    x = make_inputs(config, n, 1, torch.bfloat16, requires_grad=False, seed=1)
    dout = torch.randn(1, 8, n, 64, device="cuda", dtype=torch.bfloat16)
    a = fwd_bwd(triton_attention, x, dout, config)
    b = fwd_bwd(triton_attention, x, dout, config)
    same = torch.equal(a[0], b[0]) and all(torch.equal(u, w) for u, w in zip(a[1], b[1]))
    print(f"{'ok  ' if same else 'FAIL'} two runs bit-identical (N={n})", flush=True)
    return {"check": "deterministic", "ok": same}


def check_compile(n=4096):
    config = make_config(n, 8, 2, 64)
    x = make_inputs(config, n, 1, torch.bfloat16, requires_grad=False, seed=2)
    dout = torch.randn(1, 8, n, 64, device="cuda", dtype=torch.bfloat16)

    def f(q, k, v, gk, gv, config, layer):
        return triton_attention(q * 0.5, k, v, gk, gv, config, layer) + 1.0

    compiled = torch.compile(f, fullgraph=True)
    eager = fwd_bwd(f, x, dout, config)
    comp = fwd_bwd(compiled, x, dout, config)
    errors = [rel(comp[0], eager[0])] + [rel(u, w) for u, w in zip(comp[1], eager[1])]
    ok = max(errors) <= 1e-3
    print(f"{'ok  ' if ok else 'FAIL'} torch.compile(fullgraph) vs eager: max rel {max(errors):.2e}", flush=True)
    return {"check": "torch.compile", "ok": ok, "max_rel": max(errors)}


def check_million(n=2**20):
    config = make_config(n, 16, 16, 64)
    x = make_inputs(config, n, 1, torch.bfloat16, requires_grad=True, seed=3)
    dout = torch.randn(1, 16, n, 64, device="cuda", dtype=torch.bfloat16)
    triton_attention(*x, config, LAYER).backward(dout)  # warm up (compile, random-edge inverse)
    for t in x:
        t.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    triton_attention(*x, config, LAYER).backward(dout)
    torch.cuda.synchronize()
    ms = (time.perf_counter() - start) * 1e3
    peak = torch.cuda.max_memory_allocated() / 2**30
    finite = all(torch.isfinite(t.grad).all().item() for t in x)
    print(f"{'ok  ' if finite else 'FAIL'} 1M tokens fwd+bwd: {ms:.1f} ms, peak {peak:.1f} GiB "
          f"(inputs {base / 2**30:.1f} GiB), offsets {len(config.offsets)}", flush=True)
    return {"check": "1M tokens fwd+bwd", "ok": finite, "ms": ms, "peak_gib": peak, "inputs_gib": base / 2**30}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("."))
    p.add_argument("--skip-million", action="store_true")
    args = p.parse_args(argv)
    results = {"environment": environment(), "checks": []}
    checks = results["checks"]
    cfg = make_config(4099, 4, 2, 64)
    checks.append(compare("fp32 vs float64 gather, N=4099, GQA 2", triton_attention, gather_attention, cfg, 4099,
                          torch.float32, torch.float64, 1e-5))
    for d in (64, 128):
        cfg = make_config(16411, 8, 2, d)
        checks.append(compare(f"bf16 vs fp32 gather, N=16411, head_dim {d}, GQA 4", triton_attention,
                              gather_attention, cfg, 16411, torch.bfloat16, torch.float32, 1e-2))
    cfg = make_config(65521, 4, 4, 64)
    checks.append(compare("bf16 vs fp32 flex full mask, N=65521", triton_attention, flex_reference, cfg, 65521,
                          torch.bfloat16, torch.float32, 1e-2))
    checks.append(check_determinism())
    checks.append(check_compile())
    if not args.skip_million:
        checks.append(check_million())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check_attention.json").write_text(json.dumps(results, indent=2))
    failed = [c["check"] for c in checks if not c["ok"]]
    print("all checks passed" if not failed else f"FAILED: {failed}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
