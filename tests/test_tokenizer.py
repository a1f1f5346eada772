"""Tokenizers: byte, tiktoken by name (offline error), local tiktoken BPE files."""

import hashlib

import numpy as np
import pytest
import tiktoken
from tiktoken._educational import bpe_train
from tiktoken.load import load_tiktoken_bpe
from tiktoken_ext.openai_public import r50k_pat_str

import halo_pretrain.data.tokenizer as T
from halo_pretrain.data.tokenizer import ENDOFTEXT, TokenizerError, get_tokenizer, write_bpe_file

TEXTS = ["hello world", "Ünïcödé ✓ 日本語 🙂", "", "a <|endoftext|> b", "tabs\tand\nnewlines\r\n"]


@pytest.fixture(scope="module")
def bpe_file(tmp_path_factory):
    """A small BPE vocabulary trained by tiktoken itself, written in tiktoken's file format."""
    corpus = "the quick brown fox jumps over the lazy dog. " * 20 + "def f(x):\n    return x + 1\n" * 10
    ranks = bpe_train(corpus, vocab_size=300, pat_str=r50k_pat_str, visualise=None)
    path = tmp_path_factory.mktemp("bpe") / "tiny.tiktoken"
    write_bpe_file(ranks, path)
    return path, ranks


def test_byte_tokenizer_contract():
    tok = get_tokenizer("byte")
    assert (tok.name, tok.spec, tok.eod_id, tok.vocab_size) == ("byte", "byte", 256, 257)
    assert tok.vocab_size <= 320  # the model's small presets size their embedding for it
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids) == text
        assert np.array_equal(tok.encode_array(text), ids)
    assert tok.decode(tok.encode("x") + [tok.eod_id]) == "x" + ENDOFTEXT
    # a lone surrogate (valid as a JSON escape) becomes U+FFFD, as in tiktoken
    assert tok.encode("a\ud800b") == list("a\ufffdb".encode())


def test_encode_documents_appends_eod():
    tok = get_tokenizer("byte")
    flat, lengths = tok.encode_documents(["ab", "c"], np.uint16)
    assert flat.dtype == np.uint16 and list(flat) == [97, 98, 256, 99, 256]
    assert list(lengths) == [3, 2] and lengths.dtype == np.int32


def test_local_bpe_file_round_trip(bpe_file):
    path, ranks = bpe_file
    assert load_tiktoken_bpe(str(path)) == ranks  # our writer writes tiktoken's own format
    tok = get_tokenizer(str(path))
    assert tok.eod_id == max(ranks.values()) + 1 == 300
    assert tok.vocab_size == 301
    assert tok.name == "bpe-" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    assert tok.spec == str(path.resolve())
    ref = tiktoken.Encoding("ref", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={ENDOFTEXT: 300})
    for text in TEXTS + ["the lazy fox returns x + 1"]:
        ids = tok.encode(text)
        assert ids == ref.encode_ordinary(text)
        assert list(tok.encode_array(text)) == ids
        assert tok.decode(ids) == text
    assert len(tok.encode("the quick brown fox")) < len("the quick brown fox")  # merges happen
    # special-token text inside a document is plain text, never the EOD id
    assert tok.eod_id not in tok.encode("x <|endoftext|> y")


def test_known_file_hash_becomes_that_encoding(bpe_file, monkeypatch):
    path, _ = bpe_file
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    monkeypatch.setitem(T._KNOWN_FILE_HASHES, digest, "o200k_base")
    monkeypatch.setattr(T, "_CACHE", {})
    tok = get_tokenizer(str(path))
    assert tok.name == "o200k_base"  # tiktoken's own o200k_base constructor, fed the file's ranks
    assert tok.eod_id == 199999
    assert tok.encoding._special_tokens["<|endofprompt|>"] == 200018


def test_unknown_name_is_a_clear_error():
    with pytest.raises(TokenizerError, match="unknown tokenizer 'nope'.*'byte'.*local tiktoken BPE file"):
        get_tokenizer("nope")
    with pytest.raises(TokenizerError, match="does not exist"):
        get_tokenizer("/no/such/file.tiktoken")


def test_name_that_needs_a_download_offline(tmp_path, monkeypatch):
    import tiktoken.load

    def no_network(url):
        raise ConnectionError(f"no network for {url}")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    monkeypatch.setattr(T, "_CACHE", {})
    with pytest.raises(TokenizerError) as e:
        get_tokenizer("cl100k_base")
    msg = str(e.value)
    assert "--tokenizer /path/to/cl100k_base.tiktoken" in msg and "TIKTOKEN_CACHE_DIR" in msg


def test_not_a_bpe_file(tmp_path):
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("this is not base64 !!! x\n")
    with pytest.raises(TokenizerError, match="not a tiktoken BPE file"):
        get_tokenizer(str(bad))


def test_same_tokenizer_aliases():
    assert T.same_tokenizer("gpt2", "r50k_base")
    assert not T.same_tokenizer("byte", "gpt2")
