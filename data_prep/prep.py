"""The data-prep pipeline: stream documents, tokenize them on a pool of workers, write shards in order.

Layout (independent of ``--workers``): the non-empty documents are numbered in input order; a
hash of (seed, number) puts each in ``validation`` with probability ``val_fraction``, else in
``train``; each split's documents fill shards of ``docs_per_shard`` documents,
``<split>_<k:05d>.bin/.idx``. The reader sends batches of one shard's documents to the pool and
the writer takes the results back in submission order, so the bytes never depend on timing.

``task=(i, n)`` writes only the shards whose number k has ``k % n == i`` and no manifest; a later
run without ``task`` finds those shards complete, skips them and writes the manifest.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from halo_pretrain.data.indexed import token_dtype_for_vocab
from halo_pretrain.data.manifest import MANIFEST_NAME, Manifest, ShardEntry, load_manifest, ManifestError, SPLITS
from halo_pretrain.data.tokenizer import get_tokenizer, same_tokenizer

from .inputs import DEFAULT_TEXT_EXTS, InputError, ReadStats, inputs_digest, iter_documents, resolve_inputs
from .writer import STATE_DIR, ShardWriter, fsync_dir, shard_record, write_atomic

__all__ = ["PrepConfig", "PrepError", "run_prep", "split_of", "TOOL_VERSION"]

try:
    from halo_pretrain import __version__ as TOOL_VERSION
except Exception:  # pragma: no cover
    TOOL_VERSION = "unknown"

CONFIG_NAME = "config.json"
SHARD_GLOBS = ("train_*.bin", "train_*.idx", "validation_*.bin", "validation_*.idx")


class PrepError(RuntimeError):
    """A refusal or failure to report as one clear line (output dir conflicts, write failures)."""


@dataclass
class PrepConfig:
    inputs: list[str]
    out_dir: Path
    tokenizer: str
    text_field: str = "text"
    val_fraction: float = 0.01
    workers: int = 0  # processes that tokenize; 0 = tokenize in this process
    docs_per_shard: int = 100_000
    seed: int = 0
    text_exts: tuple[str, ...] | None = None  # --ext: what a folder walk reads (None: .txt and the data kinds)
    exclude: tuple[str, ...] = ()
    errors: str = "strict"
    skip_bad_lines: bool = False
    hf_split: str = "train"
    hf_streaming: bool = False
    task: tuple[int, int] | None = None
    overwrite: bool = False
    progress: bool = True
    batch_chars: int = 1 << 20  # a batch sent to a worker: at most this many characters ...
    batch_docs: int = 1024  # ... and this many documents


@dataclass
class PrepResult:
    out_dir: Path
    manifest_written: bool
    shards_written: list[str] = field(default_factory=list)
    shards_skipped: list[str] = field(default_factory=list)
    docs: dict[str, int] = field(default_factory=dict)
    tokens_written: int = 0
    seconds: float = 0.0
    stats: ReadStats = field(default_factory=ReadStats)


# ---- split assignment ---------------------------------------------------------------------------

_M = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


class _SplitAssigner:
    """Validation membership of document n: splitmix64(seed, n) / 2**64 < fraction, in blocks."""

    BLOCK = 1 << 14

    def __init__(self, seed: int, fraction: float) -> None:
        self.key = _splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
        self.threshold = int(fraction * 2.0 ** 64) if fraction < 1 else 1 << 64
        self.block = -1
        self.cache = np.zeros(0, dtype=bool)

    def is_validation(self, n: int) -> bool:
        b = n // self.BLOCK
        if b != self.block:
            ids = np.arange(b * self.BLOCK, (b + 1) * self.BLOCK, dtype=np.uint64)
            h = _splitmix64(ids ^ self.key)
            if self.threshold >= 1 << 64:
                self.cache = np.ones(len(ids), dtype=bool)
            else:
                self.cache = h < np.uint64(self.threshold)
            self.block = b
        return bool(self.cache[n - b * self.BLOCK])


def split_of(n: int, seed: int, fraction: float) -> str:
    """The split of document number ``n`` (exposed for tests and tools)."""
    return "validation" if _SplitAssigner(seed, fraction).is_validation(n) else "train"


# ---- workers ------------------------------------------------------------------------------------

_WORKER: dict = {}


def _worker_init(tokenizer_spec: str, dtype: str, parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    try:  # die with the parent, even on kill -9 (Linux)
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass
    if os.getppid() != parent:
        os._exit(1)
    _WORKER["tok"] = get_tokenizer(tokenizer_spec)
    _WORKER["dtype"] = np.dtype(dtype)


def _encode_batch(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return _WORKER["tok"].encode_documents(texts, _WORKER["dtype"])


class _Done(Future):
    def __init__(self, value) -> None:
        super().__init__()
        self.set_result(value)


# ---- output directory state ---------------------------------------------------------------------

def _shard_name(split: str, k: int) -> str:
    return f"{split}_{k:05d}"


def _layout_config(cfg: PrepConfig, tok, dtype, sources) -> dict:
    """What determines the bytes of every shard; a re-run must match it to resume."""
    return {
        "tool": "halo-prep",
        "tokenizer": tok.spec,
        "tokenizer_name": tok.name,
        "vocab_size": tok.vocab_size,
        "eod_id": tok.eod_id,
        "dtype": dtype.name,
        "docs_per_shard": cfg.docs_per_shard,
        "val_fraction": cfg.val_fraction,
        "seed": cfg.seed,
        "text_field": cfg.text_field,
        "text_exts": list(cfg.text_exts or DEFAULT_TEXT_EXTS),
        "exclude": list(cfg.exclude),
        "hf_split": cfg.hf_split,
        "num_input_sources": len(sources),
        "inputs_digest": inputs_digest(sources),
    }


def _tokenizer_conflict(out: Path, old_name: str, old_vocab, tok) -> PrepError:
    return PrepError(
        f"{out} holds shards made with tokenizer {old_name!r} (vocab {old_vocab}); this run uses "
        f"{tok.name!r} (vocab {tok.vocab_size}). Refusing to mix them: choose another -o, or pass "
        f"--overwrite to delete the old shards first.")


def _remove_outputs(out: Path) -> None:
    for pattern in SHARD_GLOBS + ("*.tmp", MANIFEST_NAME):
        for p in out.glob(pattern):
            p.unlink()
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)


def _prepare_out_dir(cfg: PrepConfig, layout: dict, tok) -> None:
    out = cfg.out_dir
    if out.exists() and not out.is_dir():
        raise PrepError(f"output {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / STATE_DIR).mkdir(exist_ok=True)
    except OSError as e:
        raise PrepError(f"cannot create output directory {out}: {e.strerror or e}") from None
    if cfg.overwrite:
        _remove_outputs(out)
        (out / STATE_DIR).mkdir(exist_ok=True)
    cfg_path = out / STATE_DIR / CONFIG_NAME
    has_shards = any(next(out.glob(pat), None) for pat in SHARD_GLOBS + ("*.tmp",))
    if cfg_path.is_file() and has_shards:
        try:
            old = json.loads(cfg_path.read_text())
        except ValueError:
            old = {}
        if not same_tokenizer(str(old.get("tokenizer_name")), tok.name) or old.get("vocab_size") != tok.vocab_size:
            raise _tokenizer_conflict(out, old.get("tokenizer_name"), old.get("vocab_size"), tok)
        diffs = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in layout.items()
                 if k not in ("tokenizer", "tokenizer_name") and old.get(k) != v]
        if diffs:
            raise PrepError(
                f"{out} holds shards made with other settings ({'; '.join(diffs)}). Re-run with the "
                f"same inputs and settings to resume, choose another -o, or pass --overwrite.")
    elif not cfg_path.is_file():
        if (out / MANIFEST_NAME).is_file():
            try:
                m = load_manifest(out)
                if not same_tokenizer(m.tokenizer_name, tok.name) or m.vocab_size != tok.vocab_size:
                    raise _tokenizer_conflict(out, m.tokenizer_name, m.vocab_size, tok)
            except ManifestError:
                pass
        existing = [p.name for pat in SHARD_GLOBS for p in out.glob(pat)] + (
            [MANIFEST_NAME] if (out / MANIFEST_NAME).exists() else [])
        if existing:
            raise PrepError(
                f"{out} already holds {existing[0]} (and {len(existing) - 1} more) not made by a "
                f"halo-prep run it can resume. Choose another -o, or pass --overwrite to delete them.")
    try:
        write_atomic(cfg_path, json.dumps(layout, indent=1, sort_keys=True).encode())
    except OSError as e:
        raise PrepError(f"cannot write to output directory {out}: {e.strerror or e}") from None


# ---- the run ------------------------------------------------------------------------------------

class _Progress:
    def __init__(self, enabled: bool) -> None:
        self.bar = None
        self.tokens = 0
        self.t0 = time.monotonic()
        self.last = 0.0
        if enabled:
            from tqdm import tqdm

            tty = sys.stderr.isatty()
            self.bar = tqdm(unit=" docs", file=sys.stderr, mininterval=0.5 if tty else 30,
                            dynamic_ncols=True, smoothing=0.1, desc="halo-prep")

    def update(self, docs: int, tokens: int) -> None:
        self.tokens += tokens
        if self.bar is None:
            return
        self.bar.update(docs)
        now = time.monotonic()
        if now - self.last > (0.5 if self.bar.mininterval < 1 else 30):
            self.last = now
            rate = self.tokens / max(now - self.t0, 1e-9)
            self.bar.set_postfix_str(f"{self.tokens:,} tokens, {rate:,.0f} tokens/s", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            rate = self.tokens / max(time.monotonic() - self.t0, 1e-9)
            self.bar.set_postfix_str(f"{self.tokens:,} tokens, {rate:,.0f} tokens/s", refresh=False)
            self.bar.close()


def run_prep(cfg: PrepConfig) -> PrepResult:
    t0 = time.monotonic()
    if not 0.0 <= cfg.val_fraction < 1.0:
        why = ": it would put every document in the validation split and leave nothing to train on" \
            if cfg.val_fraction == 1.0 else ""
        raise PrepError(f"--val-fraction must be within [0, 1), got {cfg.val_fraction}{why} (the default is 0.01)")
    if cfg.docs_per_shard < 1:
        raise PrepError(f"--docs-per-shard must be at least 1, got {cfg.docs_per_shard}")
    if cfg.task is not None and not (cfg.task[1] >= 1 and 0 <= cfg.task[0] < cfg.task[1]):
        raise PrepError(f"--task I/S needs 0 <= I < S, got {cfg.task[0]}/{cfg.task[1]}")
    tok = get_tokenizer(cfg.tokenizer)
    dtype = token_dtype_for_vocab(tok.vocab_size)
    stats = ReadStats()
    sources = resolve_inputs(cfg.inputs, cfg.text_exts, stats, cfg.exclude)
    layout = _layout_config(cfg, tok, dtype, sources)
    _prepare_out_dir(cfg, layout, tok)
    out = cfg.out_dir
    result = PrepResult(out_dir=out, manifest_written=False, stats=stats)

    docs = iter_documents(sources, text_field=cfg.text_field, errors=cfg.errors,
                          skip_bad_lines=cfg.skip_bad_lines, hf_split=cfg.hf_split,
                          streaming=cfg.hf_streaming, stats=stats)
    assigner = _SplitAssigner(cfg.seed, cfg.val_fraction)
    count = {s: 0 for s in SPLITS}  # documents seen per split
    records: dict[str, dict] = {}  # shard name -> record, for shards complete before or now
    writers: dict[str, ShardWriter] = {}  # open shard per split
    pending: dict[str, list[str]] = {s: [] for s in SPLITS}
    pending_chars = {s: 0 for s in SPLITS}
    mine_cache: dict[str, bool] = {}
    inflight: deque = deque()
    max_inflight = 2 * max(cfg.workers, 1) + 2
    progress = _Progress(cfg.progress)
    executor = None
    if cfg.workers > 0:
        import multiprocessing as mp

        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        executor = ProcessPoolExecutor(cfg.workers, mp_context=ctx, initializer=_worker_init,
                                       initargs=(tok.spec, dtype.name, os.getpid()))
    else:
        _WORKER.update(tok=tok, dtype=dtype)

    def wanted(name: str, k: int) -> bool:
        """Whether this run writes shard ``name`` (k is its number)."""
        if name not in mine_cache:
            rec = shard_record(out, name)
            if rec is not None:
                records[name] = rec
                result.shards_skipped.append(name)
                mine_cache[name] = False
            else:
                mine_cache[name] = cfg.task is None or k % cfg.task[1] == cfg.task[0]
        return mine_cache[name]

    def drain(limit: int) -> None:
        while len(inflight) > limit:
            split, k, last, fut = inflight.popleft()
            tokens, lengths = fut.result()
            name = _shard_name(split, k)
            w = writers.get(split)
            if w is None:
                w = writers[split] = ShardWriter(out, name, dtype)
            w.append(tokens, lengths)
            progress.update(len(lengths), len(tokens))
            result.tokens_written += len(tokens)
            if last:
                records[name] = w.finish()
                result.shards_written.append(name)
                del writers[split]

    def submit(split: str, last: bool) -> None:
        k = (count[split] - 1) // cfg.docs_per_shard
        batch = pending[split]
        pending[split], pending_chars[split] = [], 0
        if not batch:
            fut = _Done((np.zeros(0, dtype), np.zeros(0, np.int32)))
        elif executor is None:
            fut = _Done(_encode_batch(batch))
        else:
            fut = executor.submit(_encode_batch, batch)
        inflight.append((split, k, last, fut))
        drain(max_inflight)

    try:
        n = 0
        for text in docs:
            split = "validation" if assigner.is_validation(n) else "train"
            n += 1
            k = count[split] // cfg.docs_per_shard
            count[split] += 1
            if not wanted(_shard_name(split, k), k):
                progress.update(1, 0)
                continue
            pending[split].append(text)
            pending_chars[split] += len(text)
            if count[split] % cfg.docs_per_shard == 0:
                submit(split, last=True)
            elif pending_chars[split] >= cfg.batch_chars or len(pending[split]) >= cfg.batch_docs:
                submit(split, last=False)
        for split in SPLITS:  # the last, partial shard of each split
            if count[split] % cfg.docs_per_shard:
                k = count[split] // cfg.docs_per_shard
                if wanted(_shard_name(split, k), k):
                    submit(split, last=True)
        drain(0)
    except BaseException:
        for w in writers.values():
            w.abort()
        if executor is not None:  # workers finish their current batch (a second at most) and exit
            executor.shutdown(wait=False, cancel_futures=True)
        progress.close()
        raise
    if executor is not None:
        executor.shutdown()
    progress.close()
    if stats.documents == 0:
        raise InputError(f"inputs {' '.join(cfg.inputs)} hold no non-empty document "
                         f"({stats.files} sources read, {stats.empty_documents} empty documents, "
                         f"{stats.bad_lines} bad lines skipped)")
    result.docs = dict(count)

    if cfg.task is None:
        _write_manifest(cfg, tok, dtype, count, records, stats)
        result.manifest_written = True
        for p in out.glob("*.tmp"):
            p.unlink(missing_ok=True)
    result.seconds = time.monotonic() - t0
    return result


def _write_manifest(cfg: PrepConfig, tok, dtype, count: dict, records: dict, stats: ReadStats) -> None:
    splits = {}
    for split in SPLITS:
        n_shards = -(-count[split] // cfg.docs_per_shard)
        entries = []
        for k in range(n_shards):
            name = _shard_name(split, k)
            rec = records[name]
            expected = min(cfg.docs_per_shard, count[split] - k * cfg.docs_per_shard)
            if rec["num_docs"] != expected:
                raise PrepError(
                    f"shard {cfg.out_dir / name} holds {rec['num_docs']} documents, but this run puts "
                    f"{expected} there: the inputs changed since it was written. Use another -o, or "
                    f"pass --overwrite.")
            entries.append(ShardEntry(prefix=rec["name"], num_tokens=rec["num_tokens"],
                                      num_docs=rec["num_docs"], checksums=rec["checksums"]))
        splits[split] = entries
    extra = {
        "tool": "halo-prep",
        "tool_version": TOOL_VERSION,
        "inputs": list(cfg.inputs),
        "text_field": cfg.text_field,
        "val_fraction": cfg.val_fraction,
        "seed": cfg.seed,
        "docs_per_shard": cfg.docs_per_shard,
        "stats": {
            "sources": stats.files,
            "documents": stats.documents,
            "empty_documents_skipped": stats.empty_documents,
            "bad_lines_skipped": stats.bad_lines,
            "tokens": {s: sum(e.num_tokens for e in splits[s]) for s in SPLITS},
            "documents_per_split": {s: count[s] for s in SPLITS},
        },
    }
    m = Manifest(root=cfg.out_dir, tokenizer=tok.spec, tokenizer_name=tok.name,
                 vocab_size=tok.vocab_size, eod_id=tok.eod_id, dtype=dtype.name, splits=splits, extra=extra)
    write_atomic(cfg.out_dir / MANIFEST_NAME, (json.dumps(m.to_json(), indent=1) + "\n").encode())
    fsync_dir(cfg.out_dir)
