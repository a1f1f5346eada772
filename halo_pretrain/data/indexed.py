"""Megatron-LM's memory-mapped indexed dataset format (``<prefix>.bin`` + ``<prefix>.idx``).

The same files are written by Megatron-LM's ``tools/preprocess_data.py``, GPT-NeoX and our
``halo-prep``. ``<prefix>.bin`` is every token of every sequence, back to back, in one dtype.
``<prefix>.idx`` (all little-endian)::

    9 bytes   magic  b"MMIDIDX\\x00\\x00"
    uint64    version, 1
    uint8     dtype code (see DTYPE_CODES)
    uint64    S, number of sequences
    uint64    D, number of entries in the document index (documents + 1)
    int32[S]  sizes: tokens per sequence
    int64[S]  pointers: byte offset of each sequence in .bin
    int64[D]  document index: document j is sequences doc_idx[j] .. doc_idx[j+1]-1
    (int8[S]  sequence modes, only in Megatron's multimodal datasets; ignored here)

Megatron splits a document into several sequences only when asked to split sentences; ours
(and Megatron's default) have one sequence per document, so ``doc_idx`` is ``0..S``.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

__all__ = ["IndexedDataset", "IndexedFormatError", "MAGIC", "DTYPE_CODES", "CODE_DTYPES",
           "token_dtype_for_vocab", "encode_index", "UINT16_VOCAB_LIMIT"]

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
# Megatron-LM's DType enum (megatron/core/datasets/indexed_dataset.py). Older Megatron and
# fairseq read code 6 and 7 as float64; both are unused for tokens.
CODE_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
               6: np.float64, 7: np.float32, 8: np.uint16}
DTYPE_CODES = {np.dtype(v): k for k, v in CODE_DTYPES.items()}
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, doc index count

# Megatron-LM's rule (preprocess_data.py / best_fitting_int_dtype): uint16 when vocab < 65,500.
UINT16_VOCAB_LIMIT = 65500


class IndexedFormatError(ValueError):
    """A .bin/.idx pair that is not a valid indexed dataset; the message names the file."""


def token_dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when ``vocab_size < 65,500`` (Megatron-LM's rule), else int32."""
    return np.dtype(np.uint16 if vocab_size < UINT16_VOCAB_LIMIT else np.int32)


def encode_index(dtype, sizes: np.ndarray, doc_idx: np.ndarray) -> bytes:
    """The bytes of a ``.idx`` file for sequences of ``sizes`` tokens of ``dtype``."""
    dtype = np.dtype(dtype)
    sizes = np.asarray(sizes, dtype=np.int32)
    doc_idx = np.asarray(doc_idx, dtype=np.int64)
    pointers = np.zeros(len(sizes), dtype=np.int64)
    if len(sizes) > 1:
        np.cumsum(sizes[:-1], dtype=np.int64, out=pointers[1:])
    pointers *= dtype.itemsize
    header = _HEADER.pack(MAGIC, VERSION, DTYPE_CODES[dtype], len(sizes), len(doc_idx))
    return b"".join([header, sizes.tobytes(), pointers.tobytes(), doc_idx.tobytes()])


class IndexedDataset:
    """Read-only, memory-mapped view of ``prefix + ".idx"`` and ``prefix + ".bin"``.

    ``ds[i]`` is sequence ``i`` (a view into the memory map, no copy); ``ds.tokens`` is the whole
    ``.bin`` as one flat array, which is what a packed-sequence loader wants.
    """

    def __init__(self, prefix: str | Path):
        prefix = str(prefix)
        for suffix in (".idx", ".bin"):
            if prefix.endswith(suffix) and not os.path.exists(prefix + ".idx"):
                prefix = prefix[: -len(suffix)]
        self.prefix = prefix
        self.idx_path = prefix + ".idx"
        self.bin_path = prefix + ".bin"
        for path in (self.idx_path, self.bin_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"indexed dataset file {path} does not exist")
        self._read_index()
        self._map_data()

    def _read_index(self) -> None:
        path = self.idx_path
        size = os.path.getsize(path)
        if size < _HEADER.size:
            raise IndexedFormatError(f"{path}: {size} bytes, too short for an indexed-dataset header")
        with open(path, "rb") as f:
            magic, version, code, n_seq, n_doc = _HEADER.unpack(f.read(_HEADER.size))
        if magic != MAGIC:
            raise IndexedFormatError(
                f"{path}: not a Megatron MMapIndexedDataset index (magic {magic!r}, expected {MAGIC!r})")
        if version != VERSION:
            raise IndexedFormatError(f"{path}: index version {version}, only version {VERSION} is known")
        if code not in CODE_DTYPES:
            raise IndexedFormatError(f"{path}: unknown dtype code {code}")
        self.dtype = np.dtype(CODE_DTYPES[code])
        need = _HEADER.size + n_seq * (4 + 8) + n_doc * 8
        if size < need:
            raise IndexedFormatError(
                f"{path}: truncated: {size} bytes, the header's {n_seq} sequences and {n_doc} "
                f"document-index entries need {need}")
        if size not in (need, need + n_seq):  # + n_seq: Megatron's multimodal sequence modes
            raise IndexedFormatError(f"{path}: {size} bytes, expected {need} for {n_seq} sequences")
        if n_doc < 1:
            raise IndexedFormatError(f"{path}: empty document index (needs at least the leading 0)")
        idx = np.memmap(path, dtype=np.uint8, mode="r") if size else np.empty(0, np.uint8)
        off = _HEADER.size
        self.sizes = np.frombuffer(idx, dtype=np.int32, count=n_seq, offset=off)
        off += 4 * n_seq
        self.pointers = np.frombuffer(idx, dtype=np.int64, count=n_seq, offset=off)
        off += 8 * n_seq
        self.doc_idx = np.frombuffer(idx, dtype=np.int64, count=n_doc, offset=off)
        self._idx_map = idx

    def _map_data(self) -> None:
        itemsize = self.dtype.itemsize
        bin_size = os.path.getsize(self.bin_path)
        if bin_size % itemsize:
            raise IndexedFormatError(
                f"{self.bin_path}: {bin_size} bytes is not a whole number of {self.dtype} tokens")
        n = len(self.sizes)
        end = int(self.pointers[-1]) + int(self.sizes[-1]) * itemsize if n else 0
        if end > bin_size:
            raise IndexedFormatError(
                f"{self.bin_path}: {bin_size} bytes, but {self.idx_path} points up to byte {end} "
                f"(truncated .bin, or .idx of another file)")
        if bin_size:
            self.tokens = np.memmap(self.bin_path, dtype=self.dtype, mode="r")
        else:
            self.tokens = np.empty(0, dtype=self.dtype)
        self.num_tokens = int(self.sizes.sum(dtype=np.int64))

    @property
    def num_docs(self) -> int:
        return len(self.doc_idx) - 1

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self.sizes)
        if not -n <= i < n:
            raise IndexError(f"sequence {i} out of range for {n} sequences in {self.prefix}")
        i %= n
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self.tokens[start:start + int(self.sizes[i])]

    def document(self, j: int) -> np.ndarray:
        """All tokens of document ``j`` (its sequences, contiguous in ``.bin``)."""
        first, last = int(self.doc_idx[j]), int(self.doc_idx[j + 1])
        if first == last:
            return self.tokens[:0]
        start = int(self.pointers[first]) // self.dtype.itemsize
        stop = int(self.pointers[last - 1]) // self.dtype.itemsize + int(self.sizes[last - 1])
        return self.tokens[start:stop]

    def check(self) -> list[str]:
        """Consistency problems of the index against itself and the .bin (empty list: none)."""
        problems = []
        itemsize = self.dtype.itemsize
        if len(self.sizes) and int(self.sizes.min()) < 0:
            problems.append(f"{self.idx_path}: negative sequence length")
        expected = np.zeros(len(self.sizes), dtype=np.int64)
        if len(self.sizes) > 1:
            np.cumsum(self.sizes[:-1], dtype=np.int64, out=expected[1:])
        if not np.array_equal(self.pointers, expected * itemsize):
            bad = int(np.argmax(self.pointers != expected * itemsize))
            problems.append(f"{self.idx_path}: pointer of sequence {bad} is {int(self.pointers[bad])}, "
                            f"expected {int(expected[bad] * itemsize)} (sequences must be contiguous)")
        d = self.doc_idx
        if int(d[0]) != 0 or int(d[-1]) != len(self.sizes) or (len(d) > 1 and bool(np.any(np.diff(d) < 0))):
            problems.append(f"{self.idx_path}: document index must rise from 0 to {len(self.sizes)}")
        bin_size = os.path.getsize(self.bin_path)
        if bin_size != self.num_tokens * itemsize:
            problems.append(f"{self.bin_path}: {bin_size} bytes, the index describes "
                            f"{self.num_tokens * itemsize} ({self.num_tokens} tokens)")
        return problems

    def __repr__(self) -> str:
        return (f"IndexedDataset({self.prefix!r}, dtype={self.dtype}, sequences={len(self)}, "
                f"documents={self.num_docs}, tokens={self.num_tokens})")
