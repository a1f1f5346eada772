"""halo-prep end to end: round trip, determinism across worker counts, array-job tasks, dtypes."""

import json
from pathlib import Path

import numpy as np
import pytest
from tiktoken.load import load_tiktoken_bpe

from data_prep.cli import main
from data_prep.prep import PrepConfig, run_prep, split_of
from halo_pretrain.data.indexed import IndexedDataset
from halo_pretrain.data.manifest import load_manifest
from halo_pretrain.data.tokenizer import get_tokenizer, write_bpe_file


def make_docs(n, seed=0):
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "Ünïcödé", "日本語", "🙂", "x<|endoftext|>y", "\n", "\t", "def", "return"]
    return [" ".join(rng.choice(words, size=int(rng.integers(1, 40)))) + f" #{i}" for i in range(n)]


def write_corpus(root: Path, docs):
    """Half the documents as JSON lines, the other half as .txt files (sorted names keep order)."""
    root.mkdir(parents=True, exist_ok=True)
    half = len(docs) // 2
    with open(root / "a.jsonl", "w", encoding="utf-8") as f:
        for d in docs[:half]:
            f.write(json.dumps({"text": d, "id": 1}) + "\n")
    sub = root / "b"
    sub.mkdir()
    for i, d in enumerate(docs[half:]):
        (sub / f"{i:05d}.txt").write_text(d, encoding="utf-8")
    return root


def tree(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def read_back(out: Path, seed=0, val_fraction=0.3):
    """Documents (token lists without EOD) in input order, merging the splits by the assignment rule."""
    m = load_manifest(out)
    per_split = {}
    for split in ("train", "validation"):
        docs = []
        for prefix in (m.shard_prefixes(split) if m.splits[split] else []):
            ds = IndexedDataset(prefix)
            for i in range(len(ds)):
                seq = [int(t) for t in ds[i]]
                assert seq[-1] == m.eod_id and m.eod_id not in seq[:-1]
                docs.append(seq[:-1])
        per_split[split] = iter(docs)
    n_total = m.num_docs("train") + m.num_docs("validation")
    ordered = [next(per_split[split_of(n, seed, val_fraction)]) for n in range(n_total)]
    for it in per_split.values():
        assert next(it, None) is None
    return m, ordered


@pytest.fixture(scope="module")
def bpe_path(tmp_path_factory):
    from tiktoken._educational import bpe_train
    from tiktoken_ext.openai_public import r50k_pat_str

    corpus = " ".join(make_docs(60))
    ranks = bpe_train(corpus, vocab_size=290, pat_str=r50k_pat_str, visualise=None)
    path = tmp_path_factory.mktemp("tok") / "tiny.tiktoken"
    write_bpe_file(ranks, path)
    return path


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_round_trip(tmp_path, tokenizer, bpe_path):
    docs = make_docs(57)
    docs_with_empty = docs[:10] + ["", "   \n"] + docs[10:]
    corpus = write_corpus(tmp_path / "in", docs_with_empty)
    spec = "byte" if tokenizer == "byte" else str(bpe_path)
    out = tmp_path / "out"
    assert main([str(corpus), "-o", str(out), "--tokenizer", spec, "--val-fraction", "0.3",
                 "--docs-per-shard", "7", "--workers", "2", "-q"]) == 0
    m, got = read_back(out)
    tok = get_tokenizer(spec)
    assert [tok.decode(ids) for ids in got] == docs
    assert m.tokenizer == tok.spec and m.vocab_size == tok.vocab_size and m.eod_id == tok.eod_id
    assert m.dtype == "uint16"
    assert m.extra["stats"]["empty_documents_skipped"] == 2
    assert m.extra["stats"]["documents"] == len(docs)
    assert m.extra["inputs"] == [str(corpus)] and m.extra["tool_version"]
    assert 0 < m.num_docs("validation") < m.num_docs("train")
    assert [p.name for p in m.shard_prefixes("train")][:2] == ["train_00000", "train_00001"]
    for split, entries in m.splits.items():
        for e in entries[:-1]:
            assert e.num_docs == 7  # fixed documents per shard
    assert main(["verify", str(out)]) == 0


def test_identical_bytes_for_any_worker_count(tmp_path):
    corpus = write_corpus(tmp_path / "in", make_docs(300, seed=1))
    trees = []
    for workers in (0, 1, 2):
        out = tmp_path / f"out{workers}"
        cfg = PrepConfig(inputs=[str(corpus)], out_dir=out, tokenizer="byte", val_fraction=0.2,
                         docs_per_shard=40, workers=workers, progress=False, batch_docs=3)
        run_prep(cfg)  # tiny batches: many in flight, results must still land in order
        trees.append(tree(out))
    assert len(trees[0]) > 10
    assert trees[0] == trees[1] == trees[2]


def test_tasks_then_plain_run_equal_one_plain_run(tmp_path):
    corpus = write_corpus(tmp_path / "in", make_docs(200, seed=2))
    common = ["--tokenizer", "byte", "--val-fraction", "0.25", "--docs-per-shard", "30", "-q"]
    assert main([str(corpus), "-o", str(tmp_path / "one"), "--workers", "2"] + common) == 0

    split_out = tmp_path / "split"
    args = [str(corpus), "-o", str(split_out), "--workers", "1"] + common
    assert main(args + ["--task", "1/2"]) == 0
    written = {p.name for p in split_out.glob("*.idx")}
    assert written == {"train_00001.idx", "train_00003.idx", "validation_00001.idx"}
    assert not (split_out / "manifest.json").exists()
    assert main(args + ["--task", "0/2"]) == 0
    assert not (split_out / "manifest.json").exists()
    before = {p.name: p.stat().st_mtime_ns for p in split_out.glob("*.bin")}
    assert main(args) == 0  # finds every shard complete: writes only the manifest
    assert {p.name: p.stat().st_mtime_ns for p in split_out.glob("*.bin")} == before
    assert tree(split_out) == tree(tmp_path / "one")


def test_rerun_of_finished_command_is_a_no_op(tmp_path):
    corpus = write_corpus(tmp_path / "in", make_docs(40))
    args = [str(corpus), "-o", str(tmp_path / "o"), "--tokenizer", "byte", "--docs-per-shard", "9",
            "--workers", "0", "-q"]
    assert main(args) == 0
    first = tree(tmp_path / "o")
    assert main(args) == 0
    assert tree(tmp_path / "o") == first


def test_bad_task_spec(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "in", make_docs(4))
    assert main([str(corpus), "-o", str(tmp_path / "o"), "--tokenizer", "byte", "--task", "2/2", "-q"]) == 2
    assert "0 <= I < S" in capsys.readouterr().err


def _bpe_with_vocab(path: Path, vocab_size: int) -> Path:
    """A BPE file whose tokenizer has exactly ``vocab_size`` ids (ranks + the EOD after them)."""
    ranks = {bytes([i]): i for i in range(256)}
    for k in range(vocab_size - 1 - 256):  # arbitrary two-byte merges up to the size wanted
        ranks[bytes([k // 256, k % 256])] = len(ranks)
    write_bpe_file(ranks, path)
    assert len(load_tiktoken_bpe(str(path))) == vocab_size - 1
    return path


@pytest.mark.parametrize("vocab_size,dtype,code", [(65499, "uint16", 8), (65500, "int32", 4)])
def test_dtype_at_the_65500_boundary(tmp_path, vocab_size, dtype, code):
    tok_file = _bpe_with_vocab(tmp_path / f"v{vocab_size}.tiktoken", vocab_size)
    corpus = write_corpus(tmp_path / "in", ["aa ab", "zz"])
    out = tmp_path / "out"
    assert main([str(corpus), "-o", str(out), "--tokenizer", str(tok_file), "--val-fraction", "0",
                 "--workers", "0", "-q"]) == 0
    m = load_manifest(out)
    assert (m.vocab_size, m.eod_id, m.dtype) == (vocab_size, vocab_size - 1, dtype)
    idx = (out / "train_00000.idx").read_bytes()
    assert idx[17] == code  # the dtype byte after magic (9) and version (8)
    ds = IndexedDataset(out / "train_00000")
    assert ds.dtype == np.dtype(dtype)
    assert int(ds[0][-1]) == vocab_size - 1  # the largest id survives the dtype
    assert main(["verify", str(out)]) == 0
