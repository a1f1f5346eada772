"""halo-prep end-to-end throughput against raw tiktoken, and peak memory as the corpus grows.

    python benchmarks/prep_throughput.py --tokenizer cl100k_base            # or a local .tiktoken file
    python benchmarks/prep_throughput.py --tokenizer /path/cl100k_base.tiktoken --repeat 1 --growth 10 --rounds 3

The corpus is the Python standard library's own source (every machine has it), repeated to size,
written as JSON-lines files. Measured, on the same text and the same number of cores:

* raw: ``Encoding.encode_ordinary_batch(texts, num_threads=cores)`` on texts already in memory;
* halo-prep: ``python -m data_prep CORPUS -o OUT --tokenizer T --workers cores`` as a subprocess,
  wall clock from start to exit (reading, tokenizing, writing, checksums, manifest);

raw and halo-prep alternate ``--rounds`` times (the machine may be shared; the median ratio is
reported). Then halo-prep runs on a corpus ``--growth`` times larger and the peak resident memory
of its whole process tree (sampled every 20 ms) is compared. Prints a Markdown block for
docs/benchmarks.md, and writes the numbers as JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def stdlib_texts() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for p in sorted(root.rglob("*.py")):
        if "site-packages" in p.parts or "dist-packages" in p.parts:
            continue
        t = p.read_text(encoding="utf-8", errors="replace")
        if t.strip():
            texts.append(t)
    return texts


def write_corpus(texts: list[str], repeat: int, folder: Path, per_file: int = 2000) -> int:
    """``texts`` repeated ``repeat`` times as JSON-lines files; returns the number of characters."""
    folder.mkdir(parents=True, exist_ok=True)
    chars, f, k = 0, None, 0
    for r in range(repeat):
        for i, t in enumerate(texts):
            if k % per_file == 0:
                if f:
                    f.close()
                f = open(folder / f"part{k // per_file:05d}.jsonl", "w", encoding="utf-8")
            f.write(json.dumps({"text": t}) + "\n")
            chars += len(t)
            k += 1
    if f:
        f.close()
    return chars


def tree_rss(pid: int) -> int:
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p] + p.children(recursive=True)
    except psutil.Error:
        return 0
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_prep(corpus: Path, out: Path, tokenizer: str, workers: int) -> dict:
    cmd = [sys.executable, "-m", "data_prep", str(corpus), "-o", str(out), "--tokenizer", tokenizer,
           "--workers", str(workers), "--val-fraction", "0.01", "--overwrite", "-q"]
    peak = [0]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True)

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss(proc.pid))
            time.sleep(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - t0
    th.join()
    if proc.returncode:
        raise SystemExit(f"halo-prep failed ({proc.returncode}): {err}")
    m = json.loads((out / "manifest.json").read_text())
    tokens = sum(e["num_tokens"] - e["num_docs"] for s in m["splits"].values() for e in s)  # without EODs
    return {"seconds": wall, "tokens": tokens, "tokens_per_s": tokens / wall, "peak_rss_mb": peak[0] / 2**20,
            "command": " ".join(["halo-prep"] + cmd[3:])}


def run_raw(texts: list[str], tokenizer: str, threads: int) -> dict:
    from halo_pretrain.data.tokenizer import get_tokenizer

    enc = get_tokenizer(tokenizer).encoding
    t0 = time.perf_counter()
    out = enc.encode_ordinary_batch(texts, num_threads=threads)
    wall = time.perf_counter() - t0
    tokens = sum(map(len, out))
    return {"seconds": wall, "tokens": tokens, "tokens_per_s": tokens / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", default="cl100k_base", help="tiktoken name or local BPE file")
    ap.add_argument("--repeat", type=int, default=1, help="copies of the stdlib text in the throughput corpus")
    ap.add_argument("--growth", type=int, default=10, help="memory test: corpus this many times larger")
    ap.add_argument("--rounds", type=int, default=3, help="alternating raw / halo-prep measurements")
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="cores (default: all)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    import numpy
    import tiktoken

    cores = args.workers
    base = stdlib_texts()
    texts = base * args.repeat
    load_before = os.getloadavg()
    results: dict = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                     "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores "
                                f"({cores} used), {platform.system()} {platform.release()}",
                     "versions": {"python": platform.python_version(), "tiktoken": tiktoken.__version__,
                                  "numpy": numpy.__version__},
                     "tokenizer": args.tokenizer, "cores": cores, "stdlib_docs": len(base)}
    try:
        results["cpu_model"] = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                                    if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        chars = write_corpus(base, args.repeat, tmp / "corpus")
        results["corpus"] = {"documents": len(texts), "chars": chars, "mb": round(chars / 1e6, 1)}
        rounds = []
        for r in range(args.rounds):
            raw = run_raw(texts, args.tokenizer, cores)
            prep = run_prep(tmp / "corpus", tmp / "out", args.tokenizer, cores)
            assert prep["tokens"] == raw["tokens"], (prep["tokens"], raw["tokens"])
            rounds.append({"raw_tokens_per_s": raw["tokens_per_s"], "prep_tokens_per_s": prep["tokens_per_s"],
                           "ratio": prep["tokens_per_s"] / raw["tokens_per_s"], "prep_peak_rss_mb": prep["peak_rss_mb"]})
            print(f"round {r + 1}: raw {raw['tokens_per_s']:,.0f} tokens/s, halo-prep {prep['tokens_per_s']:,.0f} "
                  f"tokens/s ({rounds[-1]['ratio']:.0%}), peak RSS {prep['peak_rss_mb']:.0f} MB", file=sys.stderr)
        results["tokens"] = raw["tokens"]
        results["rounds"] = rounds
        results["command"] = prep["command"]
        results["median_ratio"] = statistics.median(x["ratio"] for x in rounds)
        results["median_raw_tokens_per_s"] = statistics.median(x["raw_tokens_per_s"] for x in rounds)
        results["median_prep_tokens_per_s"] = statistics.median(x["prep_tokens_per_s"] for x in rounds)
        del texts
        # memory: the same run on a corpus `growth` times larger
        small = statistics.median(x["prep_peak_rss_mb"] for x in rounds)
        write_corpus(base, args.repeat * args.growth, tmp / "big")
        big = run_prep(tmp / "big", tmp / "out_big", args.tokenizer, cores)
        results["memory"] = {"corpus_x1_peak_rss_mb": round(small, 1), f"corpus_x{args.growth}_peak_rss_mb":
                             round(big["peak_rss_mb"], 1), "growth": args.growth,
                             f"corpus_x{args.growth}_tokens_per_s": big["tokens_per_s"]}
        print(f"x{args.growth} corpus: {big['tokens_per_s']:,.0f} tokens/s, peak RSS {big['peak_rss_mb']:.0f} MB",
              file=sys.stderr)

    results["load_average"] = {"before": load_before, "after": os.getloadavg()}
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    mem = results["memory"]
    print(f"""
Measured {results['date']} on {results.get('cpu_model', results['machine'])}, {cores} cores
(Python {results['versions']['python']}, tiktoken {results['versions']['tiktoken']}, numpy {results['versions']['numpy']});
1-minute load average {results['load_average']['before'][0]:.1f} before, {results['load_average']['after'][0]:.1f} after.
Corpus: the Python standard library's source x{args.repeat} ({results['corpus']['documents']:,} documents,
{results['corpus']['mb']} MB, {results['tokens']:,} {args.tokenizer} tokens) as JSON lines.

| | tokens/s (median of {args.rounds}) |
| --- | ---: |
| raw `encode_ordinary_batch(num_threads={cores})`, text in memory | {results['median_raw_tokens_per_s']:,.0f} |
| `halo-prep --workers {cores}` end to end (read, tokenize, write, checksum) | {results['median_prep_tokens_per_s']:,.0f} |
| ratio (median of per-round ratios) | {results['median_ratio']:.0%} |

Per round (raw, halo-prep, ratio): {'; '.join(f"{x['raw_tokens_per_s']:,.0f}, {x['prep_tokens_per_s']:,.0f}, {x['ratio']:.0%}" for x in rounds)}

Peak RSS of the whole halo-prep process tree: {mem['corpus_x1_peak_rss_mb']:.0f} MB on the x{args.repeat} corpus,
{mem[f'corpus_x{args.growth}_peak_rss_mb']:.0f} MB on a corpus {args.growth} times larger ({mem[f'corpus_x{args.growth}_tokens_per_s']:,.0f} tokens/s).
""")


if __name__ == "__main__":
    main()
