"""The Megatron-LM indexed format: our writer checked by an independent parse, our reader checked
on files written by Megatron-LM's own writer (tests/fixtures/megatron, see make_fixture.py)."""

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from data_prep.writer import ShardWriter, shard_record
from halo_pretrain.data.indexed import IndexedDataset, IndexedFormatError, token_dtype_for_vocab

FIXTURES = Path(__file__).parent / "fixtures" / "megatron"


def parse_idx(path):
    """The .idx format read straight from the bytes, with no code from the package."""
    raw = Path(path).read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    version, code, n_seq, n_doc = struct.unpack("<QBQQ", raw[9:34])
    off = 34
    sizes = struct.unpack(f"<{n_seq}i", raw[off:off + 4 * n_seq])
    off += 4 * n_seq
    pointers = struct.unpack(f"<{n_seq}q", raw[off:off + 8 * n_seq])
    off += 8 * n_seq
    doc_idx = struct.unpack(f"<{n_doc}q", raw[off:off + 8 * n_doc])
    off += 8 * n_doc
    assert off == len(raw)
    return {"version": version, "code": code, "sizes": list(sizes), "pointers": list(pointers),
            "doc_idx": list(doc_idx)}


@pytest.mark.parametrize("dtype,code,fmt", [(np.uint16, 8, "H"), (np.int32, 4, "i")])
def test_writer_output_parsed_independently(tmp_path, dtype, code, fmt):
    docs = [[1, 2, 3, 9], [7, 9], [65535 if dtype == np.uint16 else 1 << 20, 9]]
    w = ShardWriter(tmp_path, "train_00000", dtype)
    w.append(np.array(docs[0] + docs[1], dtype), np.array([4, 2]))
    w.append(np.array(docs[2], dtype), np.array([2]))
    rec = w.finish()
    assert rec["num_tokens"] == 8 and rec["num_docs"] == 3
    idx = parse_idx(tmp_path / "train_00000.idx")
    assert idx["version"] == 1 and idx["code"] == code
    assert idx["sizes"] == [4, 2, 2]
    itemsize = np.dtype(dtype).itemsize
    assert idx["pointers"] == [0, 4 * itemsize, 6 * itemsize]
    assert idx["doc_idx"] == [0, 1, 2, 3]
    raw = (tmp_path / "train_00000.bin").read_bytes()
    assert list(struct.unpack(f"<{len(raw) // itemsize}{fmt}", raw)) == [t for d in docs for t in d]
    assert not list(tmp_path.glob("*.tmp")) and shard_record(tmp_path, "train_00000") == rec

    ds = IndexedDataset(tmp_path / "train_00000")
    assert ds.dtype == dtype and len(ds) == 3 and ds.num_tokens == 8 and ds.num_docs == 3
    assert [list(ds[i]) for i in range(3)] == docs
    assert list(ds.tokens) == [t for d in docs for t in d] and isinstance(ds.tokens, np.memmap)
    assert ds.sizes.dtype == np.int32 and ds.pointers.dtype == np.int64 and ds.doc_idx.dtype == np.int64
    assert ds.check() == []


def test_dtype_boundary():
    assert token_dtype_for_vocab(257) == np.uint16
    assert token_dtype_for_vocab(65499) == np.uint16
    assert token_dtype_for_vocab(65500) == np.int32
    assert token_dtype_for_vocab(100277) == np.int32


def test_reads_megatron_written_shards():
    expected = json.loads((FIXTURES / "expected.json").read_text())
    for name, dtype in (("sentences_uint16", np.uint16), ("docs_int32", np.int32)):
        ds = IndexedDataset(FIXTURES / name)
        docs = expected[name]
        assert ds.dtype == dtype
        assert ds.num_docs == len(docs)
        sequences = [s for d in docs for s in d]
        assert len(ds) == len(sequences)
        assert [list(map(int, ds[i])) for i in range(len(ds))] == sequences
        assert [list(map(int, ds.document(j))) for j in range(ds.num_docs)] == [sum(d, []) for d in docs]
        assert ds.num_tokens == sum(map(len, sequences)) == len(ds.tokens)
        assert ds.check() == []
    # several sequences per document: the document index is not 0..n
    assert list(IndexedDataset(FIXTURES / "sentences_uint16").doc_idx) == [0, 2, 3, 6]


def test_prefix_may_name_a_file():
    assert len(IndexedDataset(str(FIXTURES / "docs_int32.idx"))) == 2


def test_bad_files_are_named(tmp_path):
    for suffix in ("bin", "idx"):
        shutil.copy(FIXTURES / f"docs_int32.{suffix}", tmp_path / f"x.{suffix}")
    idx = tmp_path / "x.idx"
    good = idx.read_bytes()

    idx.write_bytes(b"NOTANIDX!" + good[9:])
    with pytest.raises(IndexedFormatError, match=r"x\.idx: not a Megatron"):
        IndexedDataset(tmp_path / "x")
    idx.write_bytes(good[:-5])
    with pytest.raises(IndexedFormatError, match=r"x\.idx: truncated"):
        IndexedDataset(tmp_path / "x")
    idx.write_bytes(good[:20])
    with pytest.raises(IndexedFormatError, match=r"x\.idx: .*too short"):
        IndexedDataset(tmp_path / "x")
    idx.write_bytes(good)
    (tmp_path / "x.bin").write_bytes(b"\0" * 8)
    with pytest.raises(IndexedFormatError, match=r"x\.bin: 8 bytes.*truncated"):
        IndexedDataset(tmp_path / "x")
    (tmp_path / "x.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"x\.bin does not exist"):
        IndexedDataset(tmp_path / "x")
