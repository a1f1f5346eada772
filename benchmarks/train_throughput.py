"""End-to-end training throughput and quality: HALO-S (attention auto -> Triton) against dense (SDPA).

Every measurement is a real `halo-train` run (DeepSpeed, ZeRO-1, bf16) in its own process, so an
out-of-memory is a recorded result rather than a crash. Run on a GPU machine:

    python benchmarks/train_throughput.py throughput --data DIR --out OUT
    python benchmarks/train_throughput.py quality --data DIR --out OUT --steps 300
    python benchmarks/train_throughput.py prep --out DIR            # the offline corpus: this Python's stdlib

Results: OUT/throughput.json and .md, OUT/quality.json and .md, each run's directory with metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOKENS_PER_STEP = 65536  # micro_batch_size * seq_len, kept equal across lengths


EXTRA: list[str] = []  # --set KEY=VALUE overrides, applied last


def run_train(run_dir: Path, overrides: list[str], timeout: int) -> dict:
    """One halo-train run; returns its status and metrics lines."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "halo_pretrain.train", "--config", "125m", f"run.dir={run_dir}",  # preset: overrides
           "logging.progress_bar=false", "checkpoint.interval=100000", "checkpoint.resume=false", *overrides, *EXTRA]
    start = time.time()
    with open(run_dir / "stdout.log", "w") as out:
        try:
            proc = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    log = (run_dir / "stdout.log").read_text(errors="replace")
    metrics_path = run_dir / "metrics.jsonl"
    metrics = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()] if metrics_path.exists() else []
    status = "ok" if code == 0 else ("OOM" if "out of memory" in log.lower() else f"failed ({code})")
    return {"status": status, "metrics": metrics, "wall_s": round(time.time() - start, 1), "cmd": " ".join(cmd),
            "log_tail": log[-2000:] if code != 0 else ""}


def summarise(metrics: list[dict], warmup: int) -> dict:
    steady = [m for m in metrics if m["step"] > warmup]
    if not steady:
        return {}
    return {
        "tokens_per_s": statistics.median(m["tokens_per_s"] for m in steady),
        "mfu": statistics.median(m["mfu"] for m in steady) if steady[0].get("mfu") is not None else None,
        "peak_mem_gb": max(m["mem_gb"] for m in metrics),
        "step_time_s": statistics.median(m["step_time"] for m in steady),
        "loss_last": metrics[-1]["loss"],
    }


def model_overrides(attention: str, seq_len: int, checkpointing: int, preset: str = "125m") -> list[str]:
    return [f"model.preset={preset}", f"model.attention={attention}", f"model.max_seq_len={max(seq_len, 4096)}",
            f"train.seq_len={seq_len}", "deepspeed.zero_stage=1", "train.precision=bf16",
            f"train.activation_checkpointing={checkpointing}"]


def throughput(args) -> None:
    """Every preset x length x attention, each at the first activation-checkpointing setting (in the order
    given: least recomputation first) that fits in memory; then the HALO-S / dense ratios."""
    out = Path(args.out)
    rows = []
    for preset in args.presets:
        for seq_len in args.lengths:
            if seq_len > 32768 and preset != "125m" and not args.all_lengths:
                continue  # 64k and 128k rows are the 125m preset's (issue 18)
            for attention in args.attention:
                mb = max(1, TOKENS_PER_STEP // seq_len)
                for checkpointing in args.checkpointing:
                    run_dir = out / "runs" / f"{preset}-{attention}-{seq_len}-ckpt{checkpointing}"
                    overrides = model_overrides(attention, seq_len, checkpointing, preset) + [
                        f"data.path={args.data}", f"train.micro_batch_size={mb}", "train.grad_accum=1",
                        "train.global_batch_size=null", f"train.steps={args.steps}", "eval.samples=0",
                        "optim.warmup_steps=2"]
                    result = run_train(run_dir, overrides, args.timeout)
                    row = {"preset": preset, "attention": attention, "seq_len": seq_len, "micro_batch": mb,
                           "checkpointing": checkpointing, "status": result["status"], "wall_s": result["wall_s"],
                           **summarise(result["metrics"], args.warmup)}
                    if result["log_tail"]:
                        row["log_tail"] = result["log_tail"]
                    rows.append(row)
                    (out / "throughput.json").write_text(json.dumps(rows, indent=1))
                    print(json.dumps({k: v for k, v in row.items() if k != "log_tail"}), flush=True)
                    if result["status"] != "OOM":
                        break
    if args.longest:
        for seq_len in args.longest:  # the largest context that trains at batch 1
            run_dir = out / "runs" / f"125m-auto-{seq_len}-b1"
            overrides = model_overrides("auto", seq_len, 1) + [
                f"data.path={args.data}", "train.micro_batch_size=1", "train.grad_accum=1",
                "train.global_batch_size=null", "train.steps=4", "eval.samples=0", "optim.warmup_steps=1"]
            result = run_train(run_dir, overrides, args.timeout)
            row = {"preset": "125m", "attention": "auto", "seq_len": seq_len, "micro_batch": 1, "checkpointing": 1,
                   "longest": True,
                   "status": result["status"], "wall_s": result["wall_s"], **summarise(result["metrics"], 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if result["status"] != "ok":
                break
    (out / "throughput.json").write_text(json.dumps(rows, indent=1))
    table = throughput_table(rows)
    (out / "throughput.md").write_text(table)
    print(table)


def throughput_table(rows: list[dict]) -> str:
    lines = ["| preset | attention | seq_len | micro batch | act. ckpt | status | tokens/s | MFU | peak mem GiB | step s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
        lines.append(f"| {r.get('preset', '125m')} | {r['attention']} | {r['seq_len']} | {r['micro_batch']} | "
                     f"{r['checkpointing']} | {r['status']} | {r.get('tokens_per_s', 0):,.0f} | {mfu} | "
                     f"{r.get('peak_mem_gb', 0):.1f} | {r.get('step_time_s', 0):.3f} |")
    ok = {(r.get("preset", "125m"), r["attention"], r["seq_len"]): r for r in rows
          if r["status"] == "ok" and not r.get("longest")}
    lines += ["", "| preset | seq_len | HALO-S / dense tokens/s | peak GiB HALO-S / dense |", "| --- | --- | --- | --- |"]
    for (preset, attention, seq_len), halo in ok.items():
        dense = ok.get((preset, "dense", seq_len))
        if attention == "auto" and dense and halo.get("tokens_per_s") and dense.get("tokens_per_s"):
            lines.append(f"| {preset} | {seq_len} | {halo['tokens_per_s'] / dense['tokens_per_s']:.2f}x | "
                         f"{halo['peak_mem_gb']:.1f} / {dense['peak_mem_gb']:.1f} |")
    return "\n".join(lines) + "\n"


def quality(args) -> None:
    out = Path(args.out)
    rows = []
    for attention in args.attention:
        run_dir = out / "runs" / f"quality-{attention}"
        overrides = model_overrides(attention, 4096, 0) + [
            f"data.path={args.data}", f"train.micro_batch_size={args.micro_batch}", "train.grad_accum=1",
            "train.global_batch_size=null", f"train.steps={args.steps}", f"eval.interval={args.steps // 4}",
            "eval.samples=128", f"optim.warmup_steps={max(1, args.steps // 20)}", "optim.lr=1e-3", "optim.min_lr=1e-4"]
        result = run_train(run_dir, overrides, args.timeout)
        evals = [m for m in result["metrics"] if "val_loss" in m]
        row = {"attention": attention, "status": result["status"], "steps": args.steps,
               "tokens": result["metrics"][-1]["tokens"] if result["metrics"] else 0,
               "val_loss": evals[-1]["val_loss"] if evals else None, "wall_s": result["wall_s"],
               **summarise(result["metrics"], 5)}
        if result["log_tail"]:
            row["log_tail"] = result["log_tail"]
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "log_tail"}), flush=True)
    (out / "quality.json").write_text(json.dumps(rows, indent=1))
    lines = ["| attention | steps | tokens | val loss | tokens/s | status |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        vl = f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "-"
        lines.append(f"| {r['attention']} | {r['steps']} | {r['tokens']:,} | {vl} | {r.get('tokens_per_s', 0):,.0f} | {r['status']} |")
    (out / "quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def prep(args) -> None:
    stdlib = sysconfig.get_paths()["stdlib"]
    cmd = [sys.executable, "-m", "data_prep", stdlib, "-o", args.out, "--tokenizer", "byte",
           "--ext", ".py", "--exclude", "*/site-packages/*", "--errors", "replace", "--workers", str(os.cpu_count()), "--val-fraction", "0.02"]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--presets", nargs="+", default=["125m", "350m", "1.3b"])
    t.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 32768, 65536, 131072])
    t.add_argument("--all-lengths", action="store_true", help="lengths over 32k for every preset, not only 125m")
    t.add_argument("--checkpointing", type=int, nargs="+", default=[0, 2, 1],
                   help="activation-checkpointing settings to try in order until one fits")
    t.add_argument("--attention", nargs="+", default=["auto", "dense"])
    t.add_argument("--longest", type=int, nargs="*", default=[262144, 524288, 1048576, 2097152])
    t.add_argument("--steps", type=int, default=10)
    t.add_argument("--warmup", type=int, default=3)
    q = sub.add_parser("quality")
    q.add_argument("--attention", nargs="+", default=["auto", "dense"])
    q.add_argument("--steps", type=int, default=300)
    q.add_argument("--micro-batch", type=int, default=16)
    for s in (t, q):
        s.add_argument("--data", required=True)
        s.add_argument("--out", required=True)
        s.add_argument("--timeout", type=int, default=240)
        s.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra halo-train overrides")
    pr = sub.add_parser("prep")
    pr.add_argument("--out", required=True)
    args = p.parse_args(argv)
    EXTRA[:] = getattr(args, "set", [])
    {"throughput": throughput, "quality": quality, "prep": prep}[args.mode](args)


if __name__ == "__main__":
    main()
