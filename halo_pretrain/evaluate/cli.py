"""`halo-eval MODEL`: perplexity on a prepared validation split and the long-context probe suite.

MODEL is an exported directory (halo-export) or a run directory. Writes into --out: eval.json
(everything, per-example results included), probes.md (accuracy by length and depth) and
probes_heatmap.png.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
from pathlib import Path

import torch

from ..generate import generate, load_model, load_tokenizer
from .perplexity import perplexity
from .probes import TASKS, accuracy_table, heatmap_png, is_correct, make_suite, run_suite, table_markdown


def default_lengths(max_seq_len: int) -> list[int]:
    """max_seq_len/8, /4, /2 and max_seq_len, each once."""
    return sorted({max(1, max_seq_len // k) for k in (8, 4, 2, 1)})


def data_dir_for(model_dir: Path, data: str | None) -> Path | None:
    """--data, else the data directory an export or a run records."""
    from ..export import TOKENIZER_FILE, run_data_dir

    if data:
        return Path(data)
    record = model_dir / TOKENIZER_FILE
    if record.is_file():
        recorded = json.loads(record.read_text()).get("data")
        return Path(recorded) if recorded else None
    return run_data_dir(model_dir)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="halo-eval", description=__doc__.splitlines()[0])
    p.add_argument("model", help="exported directory (halo-export) or training run directory")
    p.add_argument("-o", "--out", default=None, help="output directory (default: MODEL/eval)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step when MODEL is a run directory")
    p.add_argument("--data", default=None, help="prepared data directory (default: the one the model records)")
    p.add_argument("--split", default="validation")
    p.add_argument("--seq-len", type=int, default=None, help="perplexity window (default: max_seq_len)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=None, help="stop perplexity after about this many tokens")
    p.add_argument("--no-perplexity", action="store_true")
    p.add_argument("--probes", default=",".join(TASKS), help=f"comma-separated from {','.join(TASKS)}, or none")
    p.add_argument("--lengths", default=None, help="probe lengths in tokens (default: max_seq_len/8, /4, /2 and max_seq_len; "
                                                  "a default too short for a task is left out for it)")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    p.add_argument("--samples", type=int, default=4, help="examples per (task, length, depth)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None, help="override the recorded tokenizer")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def default_suite(tasks, lengths, depths, samples, encode, seed) -> tuple[list, list[str]]:
    """The suite over the default lengths, leaving out a (task, length) too short for the task's own
    instruction, needle and question (a byte tokenizer needs about 200 tokens for passkey)."""
    examples, skipped = [], []
    for task in tasks:
        short = []
        for n in lengths:
            try:
                examples += make_suite([task], [n], depths, samples, encode, seed)
            except ValueError as e:
                if "too short" not in str(e):  # an unknown task or a bad depth stays an error
                    raise
                short.append(str(n))
        if short:
            skipped.append(f"{task} at {', '.join(short)} tokens (too short for its instruction, needle and question)")
    if not examples:
        raise ValueError(f"every default probe length ({', '.join(map(str, lengths))}) is too short for the "
                         f"probes {', '.join(tasks)}; pass --lengths")
    return examples, skipped


def run_probes(model, tokenizer, tasks, lengths, depths, samples, seed, batch_size, defaults=False) -> dict:
    for n in lengths:
        if n > model.config.max_seq_len:
            raise ValueError(f"probe length {n} exceeds the model's max_seq_len={model.config.max_seq_len}; "
                             "pass --lengths up to it")
    skipped = []
    if defaults:
        examples, skipped = default_suite(tasks, lengths, depths, samples, tokenizer.encode, seed)
        for line in skipped:
            print(f"halo-eval: default lengths: {line} left out")
    else:
        examples = make_suite(tasks, lengths, depths, samples, tokenizer.encode, seed)
    generations = run_suite(examples, lambda prompts, n: generate(model, prompts, n, temperature=0), batch_size)
    table = accuracy_table(examples, generations)
    results = [{**ex.summary(), "generated": gen, "correct": is_correct(ex, gen)}
               for ex, gen in zip(examples, generations)]
    return {"table": table, "examples": results, "skipped": skipped}


def main(argv=None) -> int:
    args = parse_args(argv)
    model_dir = Path(args.model)
    out = Path(args.out) if args.out else model_dir / "eval"
    try:
        model = load_model(model_dir, step=args.step, device=args.device)
        report: dict = {"model": str(model_dir), "parameters": model.num_parameters()}
        data = data_dir_for(model_dir, args.data)
        if not args.no_perplexity:
            if data is None:
                print("halo-eval: no data directory recorded; pass --data DIR for perplexity (skipped)")
            else:
                ppl = perplexity(model, data, args.split, args.seq_len, args.batch_size, args.max_tokens)
                report["perplexity"] = ppl
                print(f"perplexity on {data} [{ppl['split']}]: loss {ppl['loss']:.4f}, ppl {ppl['perplexity']:.3f} "
                      f"({ppl['tokens']} tokens, windows of {ppl['seq_len']})")
        tasks = [t for t in args.probes.split(",") if t and t != "none"]
        if tasks:
            tokenizer = load_tokenizer(model_dir, args.tokenizer, data)
            lengths = ([int(n) for n in args.lengths.split(",")] if args.lengths
                       else default_lengths(model.config.max_seq_len))
            depths = [float(d) for d in args.depths.split(",")]
            report["probes"] = run_probes(model, tokenizer, tasks, lengths, depths, args.samples, args.seed,
                                          args.batch_size, defaults=not args.lengths)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        raise SystemExit(f"halo-eval: {e}") from None
    except pickle.UnpicklingError as e:
        from ..export import unpickling_refusal

        raise SystemExit(unpickling_refusal("halo-eval", model_dir, e)) from None
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(report, indent=1) + "\n")
    written = [out / "eval.json"]
    if "probes" in report:
        markdown = table_markdown(report["probes"]["table"])
        (out / "probes.md").write_text(markdown + "\n")
        heatmap_png(report["probes"]["table"], out / "probes_heatmap.png")
        written += [out / "probes.md", out / "probes_heatmap.png"]
        print(markdown)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
