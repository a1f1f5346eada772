"""Atomic shard writer.

A shard ``<out>/<name>`` is written as ``<name>.bin.tmp`` and ``<name>.idx.tmp``, flushed and
fsynced, then renamed: ``.bin`` first, then its record ``.halo-prep/<name>.json`` (token and
document counts, sizes, checksums), then ``.idx`` last. A shard is complete when all three exist
and the sizes match the record (``shard_record``), so a run killed at any point leaves either a
complete shard or one that the next run writes again -- and every file under a final name is
itself complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from halo_pretrain.data.indexed import encode_index
from halo_pretrain.fileio import fsync_dir, write_atomic

__all__ = ["ShardWriter", "shard_record", "STATE_DIR", "write_atomic", "fsync_dir"]

STATE_DIR = ".halo-prep"


def _record_path(out_dir: Path, name: str) -> Path:
    return out_dir / STATE_DIR / f"{name}.json"


def shard_record(out_dir: Path, name: str) -> dict | None:
    """The record of shard ``name`` if the shard is complete, else None."""
    rec_path = _record_path(out_dir, name)
    bin_path, idx_path = out_dir / f"{name}.bin", out_dir / f"{name}.idx"
    if not (idx_path.is_file() and bin_path.is_file() and rec_path.is_file()):
        return None
    try:
        rec = json.loads(rec_path.read_text())
    except (OSError, ValueError):
        return None
    if rec.get("bin_bytes") != bin_path.stat().st_size or rec.get("idx_bytes") != idx_path.stat().st_size:
        return None
    return rec


class ShardWriter:
    """Streams documents' tokens into one shard; ``finish()`` makes it complete, ``abort()`` removes it."""

    def __init__(self, out_dir: Path, name: str, dtype) -> None:
        self.out_dir = Path(out_dir)
        self.name = name
        self.dtype = np.dtype(dtype)
        self.bin_tmp = self.out_dir / f"{name}.bin.tmp"
        self.idx_tmp = self.out_dir / f"{name}.idx.tmp"
        self.rec_tmp = _record_path(self.out_dir, name).with_suffix(".json.tmp")
        self._lengths: list[np.ndarray] = []
        self._sha = hashlib.sha256()
        self.num_tokens = 0
        self.num_docs = 0
        self._f = open(self.bin_tmp, "wb")

    def append(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents: their tokens back to back (EOD included) and their lengths."""
        data = np.ascontiguousarray(tokens, dtype=self.dtype).tobytes()
        self._f.write(data)
        self._sha.update(data)
        self._lengths.append(np.asarray(lengths, dtype=np.int32))
        self.num_tokens += len(tokens)
        self.num_docs += len(lengths)

    def finish(self) -> dict:
        """Write the index and the record, then rename into place. Returns the record."""
        f, self._f = self._f, None
        f.flush()
        os.fsync(f.fileno())
        f.close()
        sizes = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int32)
        idx = encode_index(self.dtype, sizes, np.arange(len(sizes) + 1, dtype=np.int64))
        with open(self.idx_tmp, "wb") as g:
            g.write(idx)
            g.flush()
            os.fsync(g.fileno())
        record = {
            "name": self.name,
            "num_tokens": self.num_tokens,
            "num_docs": self.num_docs,
            "bin_bytes": self.num_tokens * self.dtype.itemsize,
            "idx_bytes": len(idx),
            "checksums": {"bin": "sha256:" + self._sha.hexdigest(),
                          "idx": "sha256:" + hashlib.sha256(idx).hexdigest()},
        }
        self.rec_tmp.parent.mkdir(parents=True, exist_ok=True)
        with open(self.rec_tmp, "w") as g:
            json.dump(record, g, indent=1, sort_keys=True)
            g.flush()
            os.fsync(g.fileno())
        os.replace(self.bin_tmp, self.out_dir / f"{self.name}.bin")
        os.replace(self.rec_tmp, _record_path(self.out_dir, self.name))
        os.replace(self.idx_tmp, self.out_dir / f"{self.name}.idx")
        fsync_dir(self.out_dir)
        return record

    def abort(self) -> None:
        """Close and delete the temporary files (a partial shard leaves nothing behind)."""
        if self._f is not None:
            try:
                self._f.close()
            except OSError:
                pass
            self._f = None
        for p in (self.bin_tmp, self.idx_tmp, self.rec_tmp):
            try:
                p.unlink(missing_ok=True)
            except OSError:
                pass
