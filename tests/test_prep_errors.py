"""Bad input and bad output: each a clear error (naming file, line, key) or a counted skip."""

import errno
import json
from pathlib import Path

import pytest

import data_prep.writer as writer_mod
from data_prep.cli import main
from halo_pretrain.data.manifest import ManifestError, load_manifest


def prep(inputs, out, *extra, tokenizer="byte"):
    return main([*map(str, inputs), "-o", str(out), "--tokenizer", tokenizer, "--val-fraction", "0",
                 "--workers", "0", "-q", *extra])


def tree(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def jsonl(path: Path, lines) -> Path:
    path.write_text("".join(l + "\n" for l in lines), encoding="utf-8")
    return path


def test_malformed_json_line(tmp_path, capsys):
    f = jsonl(tmp_path / "a.jsonl", ['{"text": "ok"}', '{"text": "broken', '{"text": "also ok"}'])
    assert prep([f], tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"{f}:2: malformed JSON" in err and "--skip-bad-lines" in err
    assert not (tmp_path / "out" / "manifest.json").exists()

    assert main([str(f), "-o", str(tmp_path / "out"), "--tokenizer", "byte", "--val-fraction", "0",
                 "--workers", "0", "--skip-bad-lines"]) == 0
    err = capsys.readouterr().err
    assert "bad lines skipped: 1" in err and f"{f}:2" in err
    m = load_manifest(tmp_path / "out")
    assert m.extra["stats"]["bad_lines_skipped"] == 1 and m.num_docs("train") == 2


def test_missing_text_field(tmp_path, capsys):
    f = jsonl(tmp_path / "a.jsonl", ['{"text": "ok"}', '{"body": "x", "id": 3}'])
    assert prep([f], tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"{f}:2: no field 'text' (fields: body, id)" in err and "--text-field" in err
    assert prep([f], tmp_path / "out", "--skip-bad-lines") == 0
    assert load_manifest(tmp_path / "out").num_docs("train") == 1

    f2 = jsonl(tmp_path / "b.jsonl", ['{"text": 5}'])
    assert prep([f2], tmp_path / "out2") == 2
    assert "field 'text' is int, not a string" in capsys.readouterr().err


def test_non_utf8_bytes(tmp_path, capsys):
    f = tmp_path / "latin1.txt"
    f.write_bytes("caf\xe9 ok".encode("latin-1"))
    assert prep([f], tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"{f}: not valid UTF-8 at byte 3" in err and "--errors replace" in err
    assert prep([f], tmp_path / "out", "--errors", "replace") == 0
    from data_prep.verify import verify_dir

    assert verify_dir(tmp_path / "out", log=lambda *_: None) == []

    g = tmp_path / "bad.jsonl"
    g.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    assert prep([g], tmp_path / "out2") == 2
    assert f"{g}:2: not valid UTF-8" in capsys.readouterr().err


def test_empty_documents_are_skipped_and_counted(tmp_path):
    f = jsonl(tmp_path / "a.jsonl", [json.dumps({"text": t}) for t in ["a", "", "  \n ", "b"]])
    (tmp_path / "empty.txt").write_text("")
    assert prep([f, tmp_path / "empty.txt"], tmp_path / "out") == 0
    m = load_manifest(tmp_path / "out")
    assert m.extra["stats"]["empty_documents_skipped"] == 3 and m.num_docs("train") == 2


def test_empty_input_set(tmp_path, capsys):
    assert prep([tmp_path / "nothing-*.jsonl"], tmp_path / "out") == 2
    assert "matched no file or folder" in capsys.readouterr().err
    (tmp_path / "d").mkdir()
    assert prep([tmp_path / "d"], tmp_path / "out") == 2
    assert "hold no readable file" in capsys.readouterr().err
    (tmp_path / "e.txt").write_text(" \n")
    assert prep([tmp_path / "e.txt"], tmp_path / "out") == 2
    assert "no non-empty document" in capsys.readouterr().err


def test_output_of_a_different_tokenizer_is_refused(tmp_path, capsys):
    from tiktoken._educational import bpe_train
    from tiktoken_ext.openai_public import r50k_pat_str

    from halo_pretrain.data.tokenizer import write_bpe_file

    bpe = tmp_path / "t.tiktoken"
    write_bpe_file(bpe_train("hello world " * 30, vocab_size=260, pat_str=r50k_pat_str, visualise=None), bpe)
    f = jsonl(tmp_path / "a.jsonl", ['{"text": "hello"}'])
    out = tmp_path / "out"
    assert prep([f], out) == 0
    before = tree(out)
    assert prep([f], out, tokenizer=str(bpe)) == 2
    err = capsys.readouterr().err
    assert "holds shards made with tokenizer 'byte'" in err and "Refusing to mix" in err
    assert tree(out) == before  # untouched
    # also when only a manifest says so (the .halo-prep folder was deleted)
    import shutil

    shutil.rmtree(out / ".halo-prep")
    assert prep([f], out, tokenizer=str(bpe)) == 2
    assert "Refusing to mix" in capsys.readouterr().err
    # --overwrite replaces them
    assert prep([f], out, "--overwrite", tokenizer=str(bpe)) == 0
    assert load_manifest(out).tokenizer == str(bpe.resolve())


def test_changed_settings_are_refused(tmp_path, capsys):
    f = jsonl(tmp_path / "a.jsonl", ['{"text": "hello"}'])
    assert prep([f], tmp_path / "out") == 0
    assert prep([f], tmp_path / "out", "--docs-per-shard", "5") == 2
    assert "docs_per_shard: 100000 -> 5" in capsys.readouterr().err
    jsonl(f, ['{"text": "hello"}', '{"text": "more input"}'])
    assert prep([f], tmp_path / "out") == 2
    assert "inputs_digest" in capsys.readouterr().err


def test_foreign_files_in_output_are_refused(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "train_00000.bin").write_bytes(b"")
    f = jsonl(tmp_path / "a.jsonl", ['{"text": "x"}'])
    assert prep([f], out) == 2
    assert "already holds train_00000.bin" in capsys.readouterr().err


def test_disk_full_keeps_previous_shards(tmp_path, monkeypatch, capsys):
    f = jsonl(tmp_path / "a.jsonl", [json.dumps({"text": f"document {i}"}) for i in range(30)])
    clean = tmp_path / "clean"
    assert prep([f], clean, "--docs-per-shard", "10") == 0

    real_append = writer_mod.ShardWriter.append
    calls = {"n": 0}

    def failing_append(self, tokens, lengths):
        if self.name == "train_00002":
            raise OSError(errno.ENOSPC, "No space left on device", str(self.bin_tmp))
        return real_append(self, tokens, lengths)

    monkeypatch.setattr(writer_mod.ShardWriter, "append", failing_append)
    out = tmp_path / "out"
    assert prep([f], out, "--docs-per-shard", "10") == 1
    err = capsys.readouterr().err
    assert "disk full" in err and "Completed shards are intact" in err
    left = tree(out)
    assert not [k for k in left if k.endswith(".tmp")] and "manifest.json" not in left
    assert {k for k in left if k.endswith((".bin", ".idx"))} == {
        "train_00000.bin", "train_00000.idx", "train_00001.bin", "train_00001.idx"}
    for k, v in left.items():
        assert v == tree(clean)[k]
    monkeypatch.setattr(writer_mod.ShardWriter, "append", real_append)
    assert prep([f], out, "--docs-per-shard", "10") == 0  # space freed: resumes
    assert tree(out) == tree(clean)


def test_unwritable_output(tmp_path, capsys):
    f = jsonl(tmp_path / "a.jsonl", ['{"text": "x"}'])
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert prep([f], blocker) == 2
    assert f"output {blocker} exists and is not a directory" in capsys.readouterr().err
    assert prep([f], blocker / "sub") == 2
    assert f"cannot create output directory {blocker / 'sub'}" in capsys.readouterr().err


def test_tokenizer_errors(tmp_path, capsys):
    f = jsonl(tmp_path / "a.jsonl", ['{"text": "x"}'])
    assert prep([f], tmp_path / "out", tokenizer="bogus") == 2
    assert "unknown tokenizer 'bogus'" in capsys.readouterr().err


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(ManifestError, match="no manifest.*halo-prep"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON.*halo-prep"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "halo-prep-manifest", "format_version": 1}')
    with pytest.raises(ManifestError, match="missing or invalid field"):
        load_manifest(tmp_path)
    with pytest.raises(ManifestError, match="does not exist"):
        load_manifest(tmp_path / "nope")


def test_missing_split(tmp_path):
    f = jsonl(tmp_path / "a.jsonl", ['{"text": "x"}'])
    assert prep([f], tmp_path / "out") == 0
    m = load_manifest(tmp_path / "out")
    with pytest.raises(ManifestError, match="'validation' has no shards.*--val-fraction"):
        m.shard_prefixes("validation")
    with pytest.raises(ManifestError, match="no split 'test'"):
        m.shard_prefixes("test")
    assert m.shard_prefixes("train") == [(tmp_path / "out").resolve() / "train_00000"]
