"""Command line: ``halo-prep INPUT... -o OUT --tokenizer NAME``, ``halo-prep verify DIR``,
``halo-prep adopt DIR ...``, ``halo-prep export-tokenizer NAME FILE``."""

from __future__ import annotations

import argparse
import errno
import os
import sys
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from halo_pretrain.data.manifest import ManifestError
from halo_pretrain.data.tokenizer import TokenizerError

from .inputs import InputError
from .prep import TOOL_VERSION, PrepConfig, PrepError, run_prep


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _task(value: str) -> tuple[int, int]:
    try:
        i, s = value.split("/")
        return int(i), int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/S (e.g. 3/16), got {value!r}") from None


def _exts(value: str) -> list[str]:
    return [e if e.startswith(".") else "." + e for e in value.split(",") if e]


def prep_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="halo-prep",
        description="Tokenize corpora into sharded Megatron-LM indexed datasets (.bin + .idx) with a "
                    "manifest.json. Other commands: `halo-prep verify DIR`, `halo-prep adopt DIR ...` "
                    "(write a manifest for shards made by Megatron-LM/GPT-NeoX), "
                    "`halo-prep export-tokenizer NAME FILE`.")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="files, folders, globs (.txt, .jsonl, .json, .parquet, optionally .gz; more text "
                        "types with --ext), a folder saved by datasets' save_to_disk, or hf:NAME[:CONFIG]")
    p.add_argument("-o", "--output", required=True, type=Path, help="output data directory")
    p.add_argument("--tokenizer", required=True,
                   help="'byte', a tiktoken encoding (gpt2, r50k_base, p50k_base, cl100k_base, o200k_base) "
                        "or a local tiktoken BPE file")
    p.add_argument("--text-field", default="text", help="JSON field / column holding the text (default: text)")
    p.add_argument("--val-fraction", type=float, default=0.01,
                   help="fraction of documents put in the validation split, in [0, 1) (default: 0.01)")
    p.add_argument("--workers", type=int, default=_cores(),
                   help="tokenizer processes (default: all cores, %(default)s here; 0: tokenize in-process)")
    p.add_argument("--docs-per-shard", type=int, default=100_000,
                   help="documents per shard; fixes the layout, whatever --workers (default: 100000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/validation assignment (default: 0)")
    p.add_argument("--ext", type=_exts, action="extend", default=None, metavar=".EXT[,.EXT]",
                   help="what a folder walk reads: only files with these extensions, as text, one file = one "
                        "document (e.g. --ext .py); default: .txt, .jsonl, .json, .parquet")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="skip files and folders whose absolute path matches this shell pattern "
                        "(folders end with /), e.g. --exclude '*/site-packages/*'; repeatable")
    p.add_argument("--errors", choices=("strict", "replace"), default="strict",
                   help="non-UTF-8 bytes: stop with an error naming the file (strict, default) or replace "
                        "them with U+FFFD")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip malformed JSON lines and records without the text field, count and report them")
    p.add_argument("--hf-split", default="train", help="split of a Hugging Face dataset to read (default: train)")
    p.add_argument("--hf-streaming", action="store_true", help="stream hf:NAME datasets instead of downloading")
    p.add_argument("--task", type=_task, default=None, metavar="I/S",
                   help="write only shards k with k %% S == I and no manifest (array jobs); afterwards run "
                        "the same command without --task to check every shard and write the manifest")
    p.add_argument("--overwrite", action="store_true",
                   help="delete shards and manifest already in the output directory first")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary")
    p.add_argument("--version", action="version", version=f"halo-prep {TOOL_VERSION}")
    return p


def _run_prep(argv: list[str]) -> int:
    args = prep_parser().parse_args(argv)
    exts = tuple(dict.fromkeys(args.ext)) if args.ext else None
    cfg = PrepConfig(inputs=args.inputs, out_dir=args.output, tokenizer=args.tokenizer,
                     text_field=args.text_field, val_fraction=args.val_fraction, workers=max(0, args.workers),
                     docs_per_shard=args.docs_per_shard, seed=args.seed, text_exts=exts, exclude=tuple(args.exclude), errors=args.errors,
                     skip_bad_lines=args.skip_bad_lines, hf_split=args.hf_split,
                     hf_streaming=args.hf_streaming, task=args.task, overwrite=args.overwrite,
                     progress=not args.quiet)
    r = run_prep(cfg)
    if not args.quiet:
        s = r.stats
        rate = r.tokens_written / max(r.seconds, 1e-9)
        lines = [
            f"halo-prep: {s.documents:,} documents from {s.files:,} sources "
            f"(train {r.docs.get('train', 0):,}, validation {r.docs.get('validation', 0):,}); "
            f"{r.tokens_written:,} tokens written in {r.seconds:.1f} s ({rate:,.0f} tokens/s)",
            f"  shards written: {len(r.shards_written)}, already complete: {len(r.shards_skipped)}",
        ]
        if s.empty_documents:
            lines.append(f"  empty documents skipped: {s.empty_documents:,}")
        if s.bad_lines:
            lines.append(f"  bad lines skipped: {s.bad_lines:,}; first: " + "; ".join(s.bad_line_examples[:3]))
        if s.skipped_files:
            lines.append(f"  files in folders with other extensions, not read: {s.skipped_files:,} (see --ext)")
        if r.manifest_written:
            lines.append(f"  manifest: {r.out_dir / 'manifest.json'}")
        else:
            lines.append(f"  task {cfg.task[0]}/{cfg.task[1]} done; no manifest: run the command without "
                         f"--task once every task is done")
        print("\n".join(lines), file=sys.stderr)
    return 0


def _run_verify(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="halo-prep verify",
                                description="Check a data directory: checksums, index consistency, token "
                                            "ids below the vocab size, an EOD token ending every document.")
    p.add_argument("data_dir", type=Path)
    p.add_argument("--no-checksums", action="store_true", help="skip the SHA-256 of every file")
    args = p.parse_args(argv)
    from .verify import verify_dir

    problems = verify_dir(args.data_dir, checksums=not args.no_checksums)
    for line in problems:
        print(f"problem: {line}", file=sys.stderr)
    return 1 if problems else 0


def _run_adopt(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="halo-prep adopt",
        description="Write manifest.json for shards made by Megatron-LM's or GPT-NeoX's preprocess_data.py, "
                    "so halo-pretrain trains on them as they are.")
    p.add_argument("data_dir", type=Path, help="where manifest.json goes (shard prefixes are stored relative to it)")
    p.add_argument("--tokenizer", required=True, help="the tokenizer the shards were made with")
    p.add_argument("--train", nargs="+", required=True, metavar="PREFIX", help="train shard prefixes (no .bin/.idx)")
    p.add_argument("--validation", nargs="*", default=[], metavar="PREFIX", help="validation shard prefixes")
    p.add_argument("--eod-id", type=int, default=None, help="end-of-document id (default: the tokenizer's)")
    args = p.parse_args(argv)
    from .adopt import adopt

    path = adopt(args.data_dir, args.tokenizer, args.train, args.validation, args.eod_id)
    print(f"wrote {path}; check it with `halo-prep verify {args.data_dir}`", file=sys.stderr)
    return 0


def _run_export_tokenizer(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="halo-prep export-tokenizer",
        description="Write a tiktoken encoding's BPE ranks to a file (on a machine with network), to pass "
                    "as --tokenizer FILE on machines without.")
    p.add_argument("name")
    p.add_argument("file", type=Path)
    args = p.parse_args(argv)
    from halo_pretrain.data.tokenizer import get_tokenizer, write_bpe_file

    tok = get_tokenizer(args.name)
    ranks = getattr(getattr(tok, "encoding", None), "_mergeable_ranks", None)
    if ranks is None:
        raise TokenizerError(f"{args.name!r} is not a tiktoken encoding; nothing to export")
    write_bpe_file(ranks, args.file)
    print(f"wrote {args.file} ({len(ranks):,} ranks); use --tokenizer {args.file}", file=sys.stderr)
    return 0


COMMANDS = {"verify": _run_verify, "adopt": _run_adopt, "export-tokenizer": _run_export_tokenizer}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = COMMANDS.get(argv[0]) if argv else None
    try:
        return command(argv[1:]) if command else _run_prep(argv)
    except KeyboardInterrupt:
        print("halo-prep: interrupted; completed shards are kept, re-run the same command to resume",
              file=sys.stderr)
        return 130
    except (InputError, TokenizerError, ManifestError, PrepError) as e:
        print(f"halo-prep: error: {e}", file=sys.stderr)
        return 2
    except BrokenProcessPool:
        print("halo-prep: error: a tokenizer worker process died (out of memory? try fewer --workers); "
              "completed shards are kept, re-run the same command to resume", file=sys.stderr)
        return 1
    except OSError as e:
        what = "disk full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"halo-prep: error: {what}{where}: {e}. Completed shards are intact; fix this and re-run "
              f"the same command to resume.", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
