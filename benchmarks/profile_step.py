"""Where a training step's GPU time goes: attention, matmuls, loss, elementwise, optimizer.

Runs the model's forward + backward + AdamW step (no DeepSpeed: the engine's own overhead is the
difference to benchmarks/train_throughput.py's step time) under torch.profiler and sums CUDA kernel
time by category. Each variant is (attention, seq_len, micro_batch, checkpointing, chunked loss,
compile: none | blocks (what train.compile does) | model (the whole model and its loss, one graph)).
Run on a GPU:  python benchmarks/profile_step.py --out OUT [--variants auto,4096,16,0,1,blocks ...]
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import defaultdict

import torch
import torch.utils.checkpoint

from halo_pretrain import get_preset
from halo_pretrain.attention import get_attention_fn, resolve_backend
from halo_pretrain.model import HaloSModel

CATEGORIES = [  # first match wins
    ("attention (HALO-S Triton)", r"halo_(fwd|bwd)"),
    ("attention (SDPA)", r"flash|fmha|cudnn|sdpa|attention"),
    ("loss (log-softmax, NLL)", r"softmax|nll|cross_entropy"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("matmul", r"gemm|cutlass|xmma|nvjet|sm90|ampere|cublas|matmul"),
    ("elementwise / norms / rope", r"."),
]


def categorise(name: str) -> str:
    for label, pattern in CATEGORIES:
        if re.search(pattern, name, re.IGNORECASE):
            return label
    return "other"


def profile(attention: str, seq_len: int, micro_batch: int, checkpointing: bool, chunked_loss: bool, compile: str,
            steps: int = 3):
    torch.manual_seed(0)
    config = get_preset("125m", attention=attention, max_seq_len=max(seq_len, 4096))
    model = HaloSModel(config).cuda().to(torch.bfloat16)
    if checkpointing:
        model.block_runner = lambda block, x, cos, sin, backend: torch.utils.checkpoint.checkpoint(
            block, x, cos, sin, backend, use_reentrant=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randint(0, 257, (micro_batch, seq_len + 1), device="cuda")
    get_attention_fn(resolve_backend(config.attention, "cuda"))  # loaded before tracing, as train.compile does
    forward = model
    if compile == "blocks":
        for block in model.blocks:
            block.compile()
    elif compile == "model":
        forward = torch.compile(model)

    def step():
        _, loss = forward(x[:, :-1], labels=x[:, 1:], return_logits=not chunked_loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) / steps * 1e3
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    by_category = defaultdict(float)
    top = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            by_category[categorise(event.name)] += event.device_time / 1e3
            top[event.name] += event.device_time / 1e3
    tokens = micro_batch * seq_len
    flops = model.flops_per_token(seq_len) * tokens
    return {
        "attention": attention, "seq_len": seq_len, "micro_batch": micro_batch, "checkpointing": checkpointing,
        "chunked_loss": chunked_loss, "compile": compile, "step_ms": wall_ms, "tokens_per_s": tokens / wall_ms * 1e3,
        "model_tflops": flops / wall_ms / 1e9, "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30,
        "kernel_ms": dict(sorted(by_category.items(), key=lambda kv: -kv[1])),
        "top_kernels": dict(sorted(top.items(), key=lambda kv: -kv[1])[:12]),
    }


DEFAULT_VARIANTS = ["auto,4096,16,0,1,none", "auto,4096,16,0,1,blocks", "auto,4096,16,0,1,model",
                    "auto,4096,16,0,0,model", "dense,4096,16,0,1,model", "auto,65536,1,0,1,model"]


def parse_variant(text: str) -> tuple:
    attention, seq_len, micro_batch, checkpointing, chunked, compile = text.split(",")
    return attention, int(seq_len), int(micro_batch), bool(int(checkpointing)), bool(int(chunked)), compile


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=None)
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS,
                   help="attention,seq_len,micro_batch,checkpointing(0/1),chunked_loss(0/1),none|blocks|model")
    args = p.parse_args()
    variants = [parse_variant(v) for v in args.variants]
    results = []
    for v in variants:
        try:
            r = profile(*v)
        except Exception as e:  # out of memory, or a compile failure: record it and go on
            r = {"variant": v, "status": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
        torch.cuda.empty_cache()
        results.append(r)
        print(json.dumps(r), flush=True)
    if args.out:
        with open(f"{args.out}/profile.json", "w") as f:
            json.dump(results, f, indent=1)
    for r in results:
        if "step_ms" not in r:
            print(r)
            continue
        parts = ", ".join(f"{k} {v:.0f}" for k, v in r["kernel_ms"].items())
        print(f"{r['attention']:>5} N={r['seq_len']:>6} mb={r['micro_batch']:>2} ckpt={int(r['checkpointing'])} "
              f"chunked={int(r['chunked_loss'])} compile={r['compile']}: {r['step_ms']:.0f} ms/step, {r['tokens_per_s']:,.0f} tok/s, "
              f"{r['model_tflops']:.0f} TFLOP/s, {r['peak_mem_gb']:.1f} GiB | kernel ms: {parts}")


if __name__ == "__main__":
    main()
