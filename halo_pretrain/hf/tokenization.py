"""The project's tokenizers as a transformers fast tokenizer: tokenizer.json, no code to run.

Every tokenizer halo-prep makes is byte-level: the byte tokenizer (ids 0..255 are the bytes) and
tiktoken BPE encodings (by name or from a local file). Both become a `tokenizers` BPE model over
GPT-2's byte-to-character alphabet: the byte tokenizer with no merges, a tiktoken encoding with its
split pattern and one merge per way of building each token from two smaller ones, ordered by the
token's rank, which is the order tiktoken merges in. Special tokens keep their ids. So
`AutoTokenizer.from_pretrained(OUT)` gives the project's ids; special-token text in the input is the
special token there (the project's `encode` reads it as plain text).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..data.tokenizer import ByteTokenizer, Tokenizer

def byte_alphabet() -> dict[int, str]:
    """GPT-2's map of the 256 bytes onto printable characters (what tokenizers' ByteLevel steps use):
    printable Latin-1 bytes are their own character, the others take 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def vocabulary(tokenizer: Tokenizer) -> tuple[dict[bytes, int], dict[str, int], str | None]:
    """(token bytes -> id, special token -> id, split pattern or None for no split)."""
    if isinstance(tokenizer, ByteTokenizer):
        return {bytes([b]): b for b in range(256)}, dict(tokenizer.specials), None
    encoding = tokenizer.encoding
    return dict(encoding._mergeable_ranks), dict(encoding._special_tokens), encoding._pat_str


def oniguruma_pattern(pattern: str) -> str:
    """tiktoken's split pattern for tokenizers' regex engine (Oniguruma), which reads a possessive bounded
    repeat `X{m,n}+` as `(X{m,n})+` (any number of repeats): it becomes the atomic group `(?>X{m,n})`."""
    atom = r"(\\p\{\w+\}|\\.|\[(?:\\.|[^\]])*\]|[^\\])"
    return re.sub(atom + r"\{(\d+),(\d+)\}\+", r"(?>\1{\2,\3})", pattern)


def merges_of(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Every (left, right) pair of tokens whose concatenation is a token, in the order of that token's rank."""
    merges = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], left, right))
    merges.sort()
    return [(left, right) for _, _, left, right in merges]


def fast_tokenizer(tokenizer: Tokenizer):
    """A `tokenizers.Tokenizer` that encodes and decodes as `tokenizer` does."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RustTokenizer

    ranks, specials, pattern = vocabulary(tokenizer)
    alphabet = byte_alphabet()

    def text(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    vocab = {text(t): i for t, i in ranks.items()}
    vocab.update(specials)  # at their own ids (an encoding's specials need not follow its ranks)
    merges = [(text(a), text(b)) for a, b in merges_of(ranks)]
    out = RustTokenizer(models.BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    out.pre_tokenizer = byte_level if pattern is None else pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(oniguruma_pattern(pattern)), behavior="isolated"), byte_level])
    out.decoder = decoders.ByteLevel()
    out.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return out


def write_tokenizer(tokenizer: Tokenizer, out_dir: Path, model_max_length: int, record: dict) -> None:
    """tokenizer.json, and tokenizer_config.json holding both what transformers reads and halo-pretrain's
    own `record` (the keys halo-generate and halo-eval read: tokenizer, eod_id, data, ...)."""
    from ..data.tokenizer import ENDOFTEXT

    fast_tokenizer(tokenizer).save(str(out_dir / "tokenizer.json"))
    # left padding: a HALO-S row's positions are its own, so a batch for generate() pads in front
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": ENDOFTEXT, "pad_token": ENDOFTEXT,
              "model_max_length": model_max_length, "padding_side": "left",
              "clean_up_tokenization_spaces": False, **record}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
