"""Input kinds: text files, folders, globs, --ext, JSON lines (plain and gzip), JSON arrays,
Parquet, Hugging Face datasets saved to disk; plus `verify` and `adopt`."""

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from data_prep.cli import main
from halo_pretrain.data.indexed import IndexedDataset
from halo_pretrain.data.manifest import load_manifest
from halo_pretrain.data.tokenizer import get_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "megatron"
BYTE = get_tokenizer("byte")


def prep(inputs, out, *extra):
    return main([*map(str, inputs), "-o", str(out), "--tokenizer", "byte", "--val-fraction", "0",
                 "--workers", "0", "-q", *extra])


def docs_of(out: Path) -> list[str]:
    m = load_manifest(out)
    texts = []
    for prefix in m.shard_prefixes("train"):
        ds = IndexedDataset(prefix)
        texts += [BYTE.decode(ds[i][:-1]) for i in range(len(ds))]
    return texts


def test_every_file_kind_in_order(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "1.txt").write_text("plain text\nsecond line")
    (d / "2.jsonl").write_text('{"text": "jl1"}\n\n{"text": "jl2", "x": 1}\n')
    with gzip.open(d / "3.jsonl.gz", "wt") as f:
        f.write('{"text": "gz1"}\n{"text": "gz2"}\n')
    (d / "4.json").write_text(json.dumps([{"text": "arr1"}, {"text": "arr2"}]))
    (d / "5.json").write_text('{"text": "json-lines in .json"}\n')
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["pq1", "pq2", "pq3"], "n": [1, 2, 3]}), d / "6.parquet", row_group_size=2)
    (d / "7.py").write_text("print('not read: no --ext')")
    (d / ".hidden.txt").write_text("hidden files are not read")
    assert prep([d], tmp_path / "out") == 0
    assert docs_of(tmp_path / "out") == ["plain text\nsecond line", "jl1", "jl2", "gz1", "gz2", "arr1", "arr2",
                                         "json-lines in .json", "pq1", "pq2", "pq3"]
    assert prep([d], tmp_path / "out2", "--ext", ".py") == 0  # --ext names what a walk reads: .py only
    assert docs_of(tmp_path / "out2") == ["print('not read: no --ext')"]
    assert prep([d], tmp_path / "out3", "--ext", ".py,.txt", "--ext", "jsonl") == 0  # a data kind keeps its parser
    assert docs_of(tmp_path / "out3") == ["plain text\nsecond line", "jl1", "jl2", "gz1", "gz2",
                                          "print('not read: no --ext')"]


def test_ext_walk_skips_data_files_beside_the_code(tmp_path, capsys):
    """The README's stdlib command: --ext .py over a tree whose test data holds JSON without a text field."""
    d = tmp_path / "lib"
    (d / "test" / "data").mkdir(parents=True)
    (d / "mod.py").write_text("def f():\n    return 1\n")
    (d / "test" / "test_mod.py").write_text("import mod\n")
    (d / "test" / "data" / "valid.json").write_text('{"apostrophes": "it\'s"}')
    (d / "test" / "data" / "notes.txt").write_text("not python")
    assert main([str(d), "-o", str(tmp_path / "out"), "--tokenizer", "byte", "--val-fraction", "0",
                 "--workers", "0", "--ext", ".py"]) == 0
    assert docs_of(tmp_path / "out") == ["def f():\n    return 1\n", "import mod\n"]
    assert "files in folders with other extensions, not read: 2 (see --ext)" in capsys.readouterr().err


def test_glob_and_explicit_files_read_any_extension_as_text(tmp_path):
    d = tmp_path / "src"
    (d / "pkg").mkdir(parents=True)
    (d / "a.py").write_text("a = 1\n")
    (d / "pkg" / "b.py").write_text("b = 2\n")
    (d / "pkg" / "c.txt").write_text("not matched by the glob")
    (d / "pkg" / "skip_me.py").write_text("excluded")
    assert prep([f"{d}/**/*.py"], tmp_path / "out", "--exclude", "*/skip_me.py") == 0
    assert docs_of(tmp_path / "out") == ["a = 1\n", "b = 2\n"]
    assert prep([d / "pkg" / "b.py", d / "a.py"], tmp_path / "out2") == 0  # argument order is kept
    assert docs_of(tmp_path / "out2") == ["b = 2\n", "a = 1\n"]


def test_stdlib_sample_as_a_corpus(tmp_path):
    """The quickstart corpus: Python's own standard library sources, present on every machine."""
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert prep([f"{stdlib}/json/*.py"], tmp_path / "out") == 0
    files = sorted((stdlib / "json").glob("*.py"))
    expected = [p.read_text(encoding="utf-8") for p in files]
    assert docs_of(tmp_path / "out") == [t for t in expected if t.strip()]


def test_text_field_option(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"content": "c1", "text": "t1"}\n')
    assert prep([tmp_path / "a.jsonl"], tmp_path / "out", "--text-field", "content") == 0
    assert docs_of(tmp_path / "out") == ["c1"]


def test_hugging_face_dataset_from_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"content": [f"row {i} é" for i in range(25)], "n": list(range(25))})
    ds.save_to_disk(str(tmp_path / "single"))
    assert prep([tmp_path / "single"], tmp_path / "out", "--text-field", "content") == 0
    assert docs_of(tmp_path / "out") == [f"row {i} é" for i in range(25)]

    dd = datasets.DatasetDict({"train": ds.select(range(3)), "test": ds.select(range(20, 22))})
    dd.save_to_disk(str(tmp_path / "dict"))
    assert prep([tmp_path / "dict"], tmp_path / "out2", "--text-field", "content", "--hf-split", "test") == 0
    assert docs_of(tmp_path / "out2") == ["row 20 é", "row 21 é"]


def test_hugging_face_errors_are_clear(tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"]})}).save_to_disk(str(tmp_path / "d"))
    assert prep([tmp_path / "d"], tmp_path / "o", "--hf-split", "validation") == 2
    assert "no split 'validation' (splits: train)" in capsys.readouterr().err
    assert prep([tmp_path / "d"], tmp_path / "o", "--text-field", "body") == 2
    assert "no column 'body' (columns: text)" in capsys.readouterr().err


def test_verify_finds_corruption(tmp_path, capsys):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(20)))
    out = tmp_path / "out"
    assert prep([tmp_path / "a.jsonl"], out) == 0
    assert main(["verify", str(out)]) == 0
    capsys.readouterr()
    binf = out / "train_00000.bin"
    good = binf.read_bytes()
    tokens = np.frombuffer(good, dtype=np.uint16).copy()

    tokens[3] = 300  # beyond the byte vocabulary (257)
    binf.write_bytes(tokens.tobytes())
    assert main(["verify", str(out)]) == 1
    err = capsys.readouterr().err
    assert "checksum" in err and "outside the vocabulary 0..256" in err

    tokens = np.frombuffer(good, dtype=np.uint16).copy()
    tokens[-1] = 65  # the last document no longer ends with EOD
    binf.write_bytes(tokens.tobytes())
    assert main(["verify", str(out), "--no-checksums"]) == 1
    assert "do not end with eod_id 256" in capsys.readouterr().err

    binf.write_bytes(good[:-2])
    assert main(["verify", str(out), "--no-checksums"]) == 1
    assert "truncated" in capsys.readouterr().err


def test_adopt_megatron_shards(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for suffix in ("bin", "idx"):
        shutil.copy(FIXTURES / f"sentences_uint16.{suffix}", data / f"mega_train.{suffix}")
    assert main(["adopt", str(data), "--tokenizer", "byte", "--train", str(data / "mega_train")]) == 0
    m = load_manifest(data)
    assert m.dtype == "uint16" and m.eod_id == 256 and m.splits["train"][0].prefix == "mega_train"
    assert m.num_docs("train") == 3
    assert main(["verify", str(data)]) == 0


def test_export_tokenizer_refuses_byte(tmp_path, capsys):
    assert main(["export-tokenizer", "byte", str(tmp_path / "x")]) == 2
    assert "not a tiktoken encoding" in capsys.readouterr().err


def test_folder_walk_order_is_sorted(tmp_path):
    d = tmp_path / "in"
    names = ["m", "b", "z", "a", "q", "c"]
    for n in names:  # created out of order: the order on disk is not the order read
        (d / n).mkdir(parents=True)
        (d / n / f"{n}2.txt").write_text(f"{n}/2")
        (d / n / f"{n}1.txt").write_text(f"{n}/1")
    (d / "k.txt").write_text("top")
    assert prep([d], tmp_path / "out") == 0
    # a folder's own files first, then its subfolders, each sorted by name
    assert docs_of(tmp_path / "out") == ["top"] + [f"{n}/{i}" for n in sorted(names) for i in (1, 2)]
