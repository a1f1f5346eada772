"""``halo-prep verify DIR``: checksums, index consistency, token ids below the vocab size,
and an end-of-document token closing every document."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from halo_pretrain.data.indexed import IndexedDataset
from halo_pretrain.data.manifest import load_manifest
from halo_pretrain.fileio import sha256_file

__all__ = ["verify_dir", "file_sha256"]

_CHUNK = 1 << 24  # tokens scanned at a time (memory stays flat whatever the shard size)


def file_sha256(path: Path) -> str:
    """The checksum as the manifest writes it: "sha256:<hex>"."""
    return "sha256:" + sha256_file(path)


def verify_dir(data_dir, checksums: bool = True, log=print) -> list[str]:
    """Every problem found in the data directory (an empty list when it is sound)."""
    m = load_manifest(data_dir)
    problems: list[str] = []
    total = 0
    for split, entries in m.splits.items():
        for e in entries:
            prefix = m.root / e.prefix
            found = _verify_shard(prefix, e, m, checksums)
            problems += found
            total += e.num_tokens
            log(f"{'ok  ' if not found else 'BAD '} {split:<10} {e.prefix}: {e.num_docs:,} documents, "
                f"{e.num_tokens:,} tokens")
    log(f"{m.root}: {sum(len(v) for v in m.splits.values())} shards, {total:,} tokens, "
        f"{len(problems)} problem(s)")
    return problems


def _verify_shard(prefix: Path, e, m, checksums: bool) -> list[str]:
    out: list[str] = []
    sums: list[str] = []
    for suffix in ("bin", "idx"):
        path = Path(f"{prefix}.{suffix}")
        if not path.is_file():
            return [f"{path}: missing"]
        want = e.checksums.get(suffix)
        if checksums and want:
            got = file_sha256(path)
            if got != want:
                sums.append(f"{path}: checksum {got} differs from the manifest's {want}")
    try:
        ds = IndexedDataset(prefix)
    except (OSError, ValueError) as err:
        return sums + [str(err)]
    out += ds.check()
    if ds.dtype.name != m.dtype:
        out.append(f"{ds.idx_path}: dtype {ds.dtype}, the manifest says {m.dtype}")
    if ds.num_tokens != e.num_tokens:
        out.append(f"{ds.idx_path}: {ds.num_tokens} tokens, the manifest says {e.num_tokens}")
    if ds.num_docs != e.num_docs:
        out.append(f"{ds.idx_path}: {ds.num_docs} documents, the manifest says {e.num_docs}")
    if out:
        return sums + out
    out = sums
    tokens = ds.tokens
    for start in range(0, len(tokens), _CHUNK):
        chunk = np.asarray(tokens[start:start + _CHUNK])
        lo, hi = int(chunk.min()), int(chunk.max())
        if hi >= m.vocab_size or lo < 0:
            bad = int(np.argmax((chunk >= m.vocab_size) | (chunk < 0))) + start
            out.append(f"{ds.bin_path}: token {int(tokens[bad])} at position {bad} is outside the "
                       f"vocabulary 0..{m.vocab_size - 1}")
            break
    docs_end = ds.doc_idx[1:] - 1  # last sequence of every document
    if ds.num_docs:
        empty = np.flatnonzero(np.diff(ds.doc_idx) == 0)
        if len(empty):
            out.append(f"{ds.idx_path}: document {int(empty[0])} has no sequence")
            return out
        ends = ds.pointers[docs_end] // ds.dtype.itemsize + ds.sizes[docs_end] - 1
        if len(ds.sizes) and int(ds.sizes.min()) == 0:
            out.append(f"{ds.idx_path}: sequence {int(np.argmin(ds.sizes))} is empty")
            return out
        last = np.asarray(tokens[ends])
        wrong = np.flatnonzero(last != m.eod_id)
        if len(wrong):
            out.append(f"{ds.bin_path}: {len(wrong)} document(s) do not end with eod_id {m.eod_id} "
                       f"(first: document {int(wrong[0])}, ends with {int(last[wrong[0]])})")
    return out
