"""Attention benchmark: the Triton HALO-S kernel against FlexAttention, SDPA and the gather path.

For each sequence length and head_dim: forward and forward+backward median time (ms) and peak extra
memory (MiB beyond the inputs) of
  triton        halo_pretrain's fused kernel (the contract's full mask)
  flex          FlexAttention with the same mask (compiled mask_mod over [G globals, N tokens])
  flex_window   FlexAttention with the window and the global slots only (strictly less work)
  sdpa_cudnn    dense causal SDPA, cuDNN backend
  sdpa_flash    dense causal SDPA, FlashAttention backend
  gather        halo_pretrain's gather backend (each query gathers its neighbour rows, like pyhalos)
and the HBM floor from a copy-bandwidth measurement made in the same run: Q, K, V, O moved once for the
forward, 12 tensor passes for forward+backward.

    python benchmarks/attention.py --out results/        # writes attention.json and attention.md there
    python benchmarks/attention.py --sweep --head-dim 64  # also tries Triton tile configs first

Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from halo_pretrain.config import HaloConfig  # noqa: E402

VARIANTS = ("triton", "flex", "flex_window", "sdpa_cudnn", "sdpa_flash", "gather")
LAYER = 0
MIB = 2**20


def make_config(n: int, heads: int, kv_heads: int, head_dim: int) -> HaloConfig:
    """The contract's defaults (G=4, W=64, R=2, offsets 2W, 4W, ... < N) at this size."""
    return HaloConfig(hidden_size=heads * head_dim, num_heads=heads, num_kv_heads=kv_heads, max_seq_len=max(n, 2))


def make_inputs(config: HaloConfig, n: int, batch: int, dtype, requires_grad: bool, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    h, kv, d, g = config.num_heads, config.num_kv_heads, config.head_dim, config.num_globals

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device="cuda", dtype=dtype).requires_grad_(requires_grad)

    return rand(batch, h, n, d), rand(batch, kv, n, d), rand(batch, kv, n, d), rand(kv, g, d), rand(kv, g, d)


_compiled_flex = None


def _flex_compiled():
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def flex_window_globals(q, k, v, global_k, global_v, config: HaloConfig, layer: int):
    """FlexAttention over [globals, window] only: a strict subset of the HALO-S neighbour set."""
    from torch.nn.attention.flex_attention import create_block_mask

    b, h, n, d = q.shape
    g, w = config.num_globals, config.local_window

    def mask_mod(b_, h_, q_idx, kv_idx):
        t = kv_idx - g
        return (kv_idx < g) | ((t >= 0) & (t <= q_idx) & (t > q_idx - w))

    key = (n, g, w, str(q.device))
    if key not in _window_masks:
        _window_masks[key] = create_block_mask(mask_mod, None, None, n, n + g, device=q.device, _compile=True)
    k = torch.cat([global_k[None].expand(b, -1, -1, -1), k], dim=2)
    v = torch.cat([global_v[None].expand(b, -1, -1, -1), v], dim=2)
    return _flex_compiled()(q, k, v, block_mask=_window_masks[key], enable_gqa=h != k.shape[1], scale=d**-0.5)


_window_masks: dict = {}


def sdpa(backend_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend_name]

    def run(q, k, v, global_k, global_v, config, layer):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])

    return run


def attention_fn(variant: str):
    if variant == "triton":
        from halo_pretrain.attention.triton_kernel import triton_attention

        return triton_attention
    if variant == "flex":
        from halo_pretrain.attention.flex import flex_attention_halo

        return flex_attention_halo
    if variant == "flex_window":
        return flex_window_globals
    if variant.startswith("sdpa_"):
        return sdpa(variant.split("_", 1)[1])
    if variant == "gather":
        from halo_pretrain.attention.gather import gather_attention

        return gather_attention
    raise ValueError(f"--variants: unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")


def bench_ms(fn, grad_to_none=None) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median"))


def peak_extra_mib(fn) -> float:
    """Peak device memory allocated while fn runs, beyond what was allocated before (MiB)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / MIB


def measure(variant: str, n: int, head_dim: int, heads: int, kv_heads: int, batch: int, dtype) -> dict:
    config = make_config(n, heads, kv_heads, head_dim)
    fn = attention_fn(variant)
    row = {"variant": variant, "n": n, "head_dim": head_dim, "heads": heads, "kv_heads": kv_heads, "batch": batch}
    try:
        with torch.no_grad():
            x = make_inputs(config, n, batch, dtype, requires_grad=False)
            fn(*x, config, LAYER)  # compile / warm up
            row["fwd_ms"] = bench_ms(lambda: fn(*x, config, LAYER))
            row["fwd_peak_mib"] = peak_extra_mib(lambda: fn(*x, config, LAYER))
        del x
        x = make_inputs(config, n, batch, dtype, requires_grad=True)
        dout = torch.randn(batch, heads, n, head_dim, device="cuda", dtype=dtype)

        def step():
            fn(*x, config, LAYER).backward(dout)

        step()
        row["fwdbwd_ms"] = bench_ms(step, grad_to_none=list(x))
        for t in x:
            t.grad = None
        row["fwdbwd_peak_mib"] = peak_extra_mib(step)
    except torch.cuda.OutOfMemoryError:
        row["error"] = "out of memory"
    except Exception as e:  # a baseline that cannot run at this size is a result, not a crash
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    finally:
        x = dout = None
        torch.cuda.empty_cache()
    return row


def copy_bandwidth() -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written."""
    src = torch.randn(2**29, device="cuda", dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def floor_rows(bandwidth: float, n: int, head_dim: int, heads: int, kv_heads: int, batch: int, dtype) -> dict:
    """Time to move Q, K, V, O once (forward) and 12 tensor passes (forward+backward) at `bandwidth`."""
    item = torch.tensor([], dtype=dtype).element_size()
    q_bytes = batch * heads * n * head_dim * item
    kv_bytes = batch * kv_heads * n * head_dim * item
    fwd = 2 * q_bytes + 2 * kv_bytes  # read Q, K, V; write O
    bwd = 4 * q_bytes + 4 * kv_bytes  # read Q, K, V, O, dO; write dQ, dK, dV
    return {"variant": "hbm_floor", "n": n, "head_dim": head_dim, "heads": heads, "kv_heads": kv_heads,
            "batch": batch, "fwd_ms": fwd / bandwidth * 1e3, "fwdbwd_ms": (fwd + bwd) / bandwidth * 1e3}


# ---- Triton tile sweep -------------------------------------------------------------------------------------

# (block, num_warps, num_stages)
FWD_TILES = [(16, 1, 2), (16, 1, 3), (16, 1, 4), (16, 2, 3), (32, 1, 3), (32, 2, 2), (32, 2, 3), (32, 4, 3),
             (64, 4, 2)]
BWD_TILES = FWD_TILES


def sweep_tiles(n: int, head_dim: int, heads: int, kv_heads: int, batch: int, dtype) -> dict:
    """Time each tile config of each Triton kernel (others at their default); keep the fastest."""
    from halo_pretrain.attention import triton_kernel as tk

    config = make_config(n, heads, kv_heads, head_dim)
    x = make_inputs(config, n, batch, dtype, requires_grad=False)
    key = tk.layer_key(config.seed, LAYER)
    pattern = (config.local_window, list(config.offsets), config.num_random, key)
    out, lse = tk._forward(*x, *pattern)
    dout = torch.randn_like(out)
    block_d = tk._block_d(head_dim)
    results = {}
    for kernel, tiles, run in (
        ("fwd", FWD_TILES, lambda: tk._forward(*x, *pattern)),
        ("dq", BWD_TILES, lambda: tk._backward(dout, *x, out, lse, *pattern)),
        ("dkv", BWD_TILES, lambda: tk._backward(dout, *x, out, lse, *pattern)),
    ):
        timings = []
        for tile in tiles:
            tk.TILE_OVERRIDES[(kernel, block_d, dtype)] = tile
            try:
                run()
                timings.append((bench_ms(run), tile))
            except Exception as e:  # e.g. out of shared memory for this tile
                print(f"  {kernel} {tile}: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)
        timings.sort()
        tk.TILE_OVERRIDES[(kernel, block_d, dtype)] = timings[0][1]
        results[kernel] = [{"tile": list(t), "ms": ms} for ms, t in timings]
        print(f"  sweep {kernel} d={head_dim}: " + ", ".join(f"{t}: {ms:.3f}" for ms, t in timings), flush=True)
    return results


def profile_triton(n: int, head_dim: int, heads: int, kv_heads: int, batch: int, dtype) -> str:
    """Per-kernel device time of one Triton forward+backward (torch.profiler), as a text table."""
    from torch.profiler import ProfilerActivity, profile

    from halo_pretrain.attention.triton_kernel import triton_attention

    config = make_config(n, heads, kv_heads, head_dim)
    x = make_inputs(config, n, batch, dtype, requires_grad=True)
    dout = torch.randn(batch, heads, n, head_dim, device="cuda", dtype=dtype)
    for _ in range(3):
        triton_attention(*x, config, LAYER).backward(dout)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            triton_attention(*x, config, LAYER).backward(dout)
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=40)


def host_overhead_us(n: int = 1024, head_dim: int = 64, heads: int = 16, calls: int = 200) -> dict:
    """Host time per call (µs, no device sync inside the loop) of the Triton path's layers at a small N."""
    from halo_pretrain.attention import triton_kernel as tk

    config = make_config(n, heads, heads, head_dim)
    x = make_inputs(config, n, 1, torch.bfloat16, requires_grad=False)
    pattern = (config.local_window, list(config.offsets), config.num_random, tk.layer_key(config.seed, LAYER))
    out, lse = tk._forward(*x, *pattern)
    dout = torch.randn_like(out)
    xg = [t.detach().requires_grad_() for t in x]
    steps = {
        "kernel launch only: _forward": lambda: tk._forward(*x, *pattern),
        "kernel launches only: _backward": lambda: tk._backward(dout, *x, out, lse, *pattern),
        "triton_attention forward (custom op)": lambda: tk.triton_attention(*x, config, LAYER),
        "triton_attention forward+backward (autograd)": lambda: tk.triton_attention(*xg, config, LAYER).backward(dout),
    }
    result = {}
    for name, fn in steps.items():
        fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        result[name] = (time.perf_counter() - start) / calls * 1e6
        torch.cuda.synchronize()
    return result


# ---- report ------------------------------------------------------------------------------------------------

def markdown(rows: list[dict]) -> str:
    def cell(r, k, fmt):
        return fmt.format(r[k]) if k in r else "—"

    lines = ["| head_dim | N | variant | fwd ms | fwd+bwd ms | fwd peak MiB | fwd+bwd peak MiB | note |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['head_dim']} | {r['n']} | {r['variant']} | {cell(r, 'fwd_ms', '{:.3f}')} | "
                     f"{cell(r, 'fwdbwd_ms', '{:.3f}')} | {cell(r, 'fwd_peak_mib', '{:.0f}')} | "
                     f"{cell(r, 'fwdbwd_peak_mib', '{:.0f}')} | {r.get('error', '')} |")
    return "\n".join(lines)


def environment() -> dict:
    import triton

    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    p.add_argument("--head-dim", type=int, nargs="+", default=[64, 128])
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=16)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--sweep", action="store_true", help="first pick Triton tiles by timing at the largest N")
    p.add_argument("--profile", type=int, nargs="*", default=[], help="print a Triton profile at these N")
    p.add_argument("--max-seconds", type=float, default=480, help="stop starting new measurements after this")
    p.add_argument("--out", type=Path, default=Path("."), help="folder for attention.json and attention.md")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/attention.py needs a CUDA GPU")
    for v in args.variants:
        attention_fn(v)
    from torch import _dynamo

    _dynamo.config.cache_size_limit = 256  # one flex compile per (mask, shape)
    dtype = getattr(torch, args.dtype)
    start = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"environment": environment(), "sweeps": {}, "rows": []}
    bandwidth = copy_bandwidth()
    report["environment"]["copy_bandwidth_tb_s"] = bandwidth / 1e12
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write)", flush=True)

    def save():
        (args.out / "attention.json").write_text(json.dumps(report, indent=2))
        (args.out / "attention.md").write_text(markdown(report["rows"]) + "\n")

    report["host_overhead_us"] = host_overhead_us()
    print("host time per call (µs): " + ", ".join(f"{k}: {v:.0f}" for k, v in report["host_overhead_us"].items()),
          flush=True)
    for n in args.profile:
        text = profile_triton(n, args.head_dim[0], args.heads, args.kv_heads, args.batch, dtype)
        print(f"profile N={n} head_dim={args.head_dim[0]} (5 forward+backward steps)\n{text}", flush=True)
        report.setdefault("profiles", {})[str(n)] = text
    for d in args.head_dim:
        if args.sweep and "triton" in args.variants:
            report["sweeps"][str(d)] = sweep_tiles(max(args.n), d, args.heads, args.kv_heads, args.batch, dtype)
            save()
        for n in args.n:
            report["rows"].append(floor_rows(bandwidth, n, d, args.heads, args.kv_heads, args.batch, dtype))
            for v in args.variants:
                if time.time() - start > args.max_seconds:
                    report["rows"].append({"variant": v, "n": n, "head_dim": d, "error": "skipped: time budget"})
                    continue
                row = measure(v, n, d, args.heads, args.kv_heads, args.batch, dtype)
                report["rows"].append(row)
                print(f"d={d} n={n} {v}: " + ", ".join(f"{k}={val:.3f}" if isinstance(val, float) else f"{k}={val}"
                                                      for k, val in row.items() if k not in ("variant", "n")),
                      flush=True)
                save()
    save()
    print(markdown(report["rows"]))


if __name__ == "__main__":
    main()
