"""Tokenizers shared by data prep, the trainer, the generator and the evaluator.

``get_tokenizer(spec)`` accepts:

* ``"byte"`` -- built in, no files: ids 0..255 are the UTF-8 bytes, then the specials
  (``<|endoftext|>`` = 256), so ``vocab_size`` is 257.
* a tiktoken encoding name (``gpt2``, ``r50k_base``, ``p50k_base``, ``cl100k_base``, ``o200k_base``).
  tiktoken downloads the BPE ranks once and caches them (``TIKTOKEN_CACHE_DIR``); with no network
  and no cache the error says how to pass a local file instead.
* a path to a local tiktoken BPE file (``<base64 token> <rank>`` per line, as tiktoken itself
  stores them). A file whose SHA-256 is that of a known OpenAI encoding becomes that encoding (same
  name, split pattern and special tokens), so ``cl100k_base.tiktoken`` copied onto an offline cluster
  is ``cl100k_base``. Any other file (named ``bpe-<sha256 prefix>``) gets the GPT-2 split
  pattern and one special token, ``<|endoftext|>``, right after the highest rank.

Every tokenizer has ``name`` (canonical, used to refuse mixing shards of different tokenizers),
``spec`` (what to pass to ``get_tokenizer`` to get it back), ``vocab_size`` and ``eod_id``.
``encode`` treats special-token text in the input as plain text (documents are data, not markup).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..fileio import sha256_file

__all__ = ["Tokenizer", "ByteTokenizer", "TiktokenTokenizer", "get_tokenizer", "TokenizerError",
           "ENDOFTEXT", "KNOWN_TIKTOKEN_NAMES"]

ENDOFTEXT = "<|endoftext|>"

# Encodings we accept by name; the ones with a .tiktoken file also by the file's SHA-256
# (the hashes tiktoken itself checks downloads against).
KNOWN_TIKTOKEN_NAMES = ("gpt2", "r50k_base", "p50k_base", "cl100k_base", "o200k_base")
_KNOWN_FILE_HASHES = {
    "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930": "r50k_base",
    "94b5ca7dff4d00767bc256fdd1b27e5b17361d7b8a5f968547f9f23eb70d2069": "p50k_base",
    "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7": "cl100k_base",
    "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d": "o200k_base",
}
_FILE_FOR_NAME = {"gpt2": "r50k_base.tiktoken", "r50k_base": "r50k_base.tiktoken",
                  "p50k_base": "p50k_base.tiktoken", "cl100k_base": "cl100k_base.tiktoken",
                  "o200k_base": "o200k_base.tiktoken"}


class TokenizerError(ValueError):
    """A tokenizer could not be made; the message says what to do."""


class Tokenizer:
    """Base class: ``name``, ``spec``, ``vocab_size``, ``eod_id``, ``encode``, ``decode``."""

    name: str
    spec: str
    vocab_size: int
    eod_id: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def encode_array(self, text: str) -> np.ndarray:
        """``encode`` as a 1-D integer array (no Python int list); subclasses make it fast."""
        return np.asarray(self.encode(text), dtype=np.int64)

    def encode_documents(self, texts: Sequence[str], dtype) -> tuple[np.ndarray, np.ndarray]:
        """Encode documents, each followed by ``eod_id``: (flat tokens of ``dtype``, lengths int32)."""
        arrays = [self.encode_array(t) for t in texts]
        lengths = np.fromiter((len(a) + 1 for a in arrays), dtype=np.int32, count=len(arrays))
        flat = np.empty(int(lengths.sum(dtype=np.int64)), dtype=dtype)
        pos = 0
        for a in arrays:
            n = len(a)
            flat[pos:pos + n] = a
            flat[pos + n] = self.eod_id
            pos += n + 1
        return flat, lengths

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, eod_id={self.eod_id})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes are ids 0..255; specials follow. Lone surrogates are encoded as U+FFFD."""

    SPECIALS = (ENDOFTEXT,)

    def __init__(self) -> None:
        self.name = "byte"
        self.spec = "byte"
        self.specials = {s: 256 + i for i, s in enumerate(self.SPECIALS)}
        self.vocab_size = 256 + len(self.SPECIALS)
        self.eod_id = self.specials[ENDOFTEXT]

    @staticmethod
    def _bytes(text: str) -> bytes:
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates (a JSON "\ud800" escape): U+FFFD, as tiktoken does
            return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode("utf-8")

    def encode(self, text: str) -> list[int]:
        return list(self._bytes(text))

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(self._bytes(text), dtype=np.uint8)

    def decode(self, ids: Iterable[int]) -> str:
        names = {v: k for k, v in self.specials.items()}
        out, buf = [], bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                buf.append(i)
                continue
            out.append(buf.decode("utf-8", "replace"))
            buf = bytearray()
            out.append(names.get(i, ""))
        out.append(buf.decode("utf-8", "replace"))
        return "".join(out)


class TiktokenTokenizer(Tokenizer):
    """A ``tiktoken.Encoding``; ``eod_id`` is its ``<|endoftext|>``."""

    def __init__(self, encoding, name: str, spec: str) -> None:
        self.encoding = encoding
        self.name = name
        self.spec = spec
        self.vocab_size = int(encoding.n_vocab)
        if ENDOFTEXT not in encoding._special_tokens:
            raise TokenizerError(f"tiktoken encoding {name!r} has no {ENDOFTEXT} token")
        self.eod_id = int(encoding._special_tokens[ENDOFTEXT])

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def encode_array(self, text: str) -> np.ndarray:
        # encode with no special token allowed == encode_ordinary, but straight into a buffer
        try:
            return self.encoding.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
        except UnicodeEncodeError:  # lone surrogates: what tiktoken's encode_ordinary does
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            return self.encoding.encode_to_numpy(text, allowed_special=set(), disallowed_special=())

    def decode(self, ids: Iterable[int]) -> str:
        return self.encoding.decode([int(i) for i in ids])


def _offline_hint(name: str) -> str:
    fname = _FILE_FOR_NAME.get(name, f"{name}.tiktoken")
    return (
        f"On a machine without network, pass a local BPE file instead: --tokenizer /path/to/{fname} "
        f"(copy it from a machine with network, e.g. `python -m data_prep export-tokenizer {name} {fname}`), "
        f"or set TIKTOKEN_CACHE_DIR to a directory holding tiktoken's cache from such a machine."
    )


def _tiktoken_by_name(name: str) -> TiktokenTokenizer:
    import tiktoken

    try:
        enc = tiktoken.get_encoding(name)
    except ValueError as e:
        if "Unknown encoding" in str(e):
            raise TokenizerError(
                f"unknown tokenizer {name!r}: use 'byte', a tiktoken encoding "
                f"({', '.join(KNOWN_TIKTOKEN_NAMES)}) or a path to a local tiktoken BPE file"
            ) from None
        raise TokenizerError(f"tokenizer {name!r} could not be loaded: {e}. {_offline_hint(name)}") from e
    except Exception as e:  # requests' ConnectionError and friends: no network, no cache
        raise TokenizerError(
            f"tokenizer {name!r} needs its BPE file, which tiktoken could not download "
            f"({type(e).__name__}). {_offline_hint(name)}"
        ) from e
    return TiktokenTokenizer(enc, name=name, spec=name)


def _tiktoken_from_file(path: Path) -> TiktokenTokenizer:
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    spec = str(path.resolve())
    digest = sha256_file(path)
    try:
        ranks = load_tiktoken_bpe(str(path))
    except Exception as e:
        raise TokenizerError(
            f"{path}: not a tiktoken BPE file (expected lines '<base64 token> <rank>'): {e}") from None
    if not ranks:
        raise TokenizerError(f"{path}: empty tiktoken BPE file")
    known = _KNOWN_FILE_HASHES.get(digest)
    if known is not None:
        enc = tiktoken.Encoding(**_known_params(known, ranks))
        return TiktokenTokenizer(enc, name=known, spec=spec)
    from tiktoken_ext.openai_public import r50k_pat_str

    eod = max(ranks.values()) + 1
    name = f"bpe-{digest[:16]}"  # the content, not the file name, identifies it
    enc = tiktoken.Encoding(name=name, pat_str=r50k_pat_str, mergeable_ranks=ranks,
                            special_tokens={ENDOFTEXT: eod})
    return TiktokenTokenizer(enc, name=name, spec=spec)


def _known_params(name: str, ranks: dict) -> dict:
    """tiktoken's own constructor for ``name``, fed ``ranks`` instead of downloading them."""
    from tiktoken_ext import openai_public as op

    original = op.load_tiktoken_bpe
    op.load_tiktoken_bpe = lambda *args, **kwargs: ranks
    try:
        return getattr(op, name)()
    finally:
        op.load_tiktoken_bpe = original


_CACHE: dict[str, Tokenizer] = {}


def get_tokenizer(name_or_file: str) -> Tokenizer:
    """The tokenizer named ``name_or_file`` ("byte", a tiktoken name, or a local BPE file path)."""
    spec = str(name_or_file)
    if spec in _CACHE:
        return _CACHE[spec]
    if spec == "byte":
        tok: Tokenizer = ByteTokenizer()
    elif os.path.isfile(spec):
        tok = _tiktoken_from_file(Path(spec))
    elif os.sep in spec or spec.endswith((".tiktoken", ".bpe")):
        raise TokenizerError(f"tokenizer file {spec} does not exist")
    else:
        tok = _tiktoken_by_name(spec)
    _CACHE[spec] = tok
    return tok


def write_bpe_file(ranks: dict[bytes, int], path: str | Path) -> None:
    """Write BPE ranks in tiktoken's own file format (what ``load_tiktoken_bpe`` reads)."""
    import base64

    with open(path, "wb") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")


def same_tokenizer(a: str, b: str) -> bool:
    """Whether two canonical tokenizer names denote the same token ids (gpt2 is r50k_base)."""
    alias = {"gpt2": "r50k_base"}
    return alias.get(a, a) == alias.get(b, b)
