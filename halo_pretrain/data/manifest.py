"""``manifest.json``: what ``halo-prep`` wrote into a data directory.

The trainer, generator and evaluator find their shards and tokenizer through it::

    m = load_manifest("data/stdlib")
    tok = get_tokenizer(m.tokenizer)
    for prefix in m.shard_prefixes("train"):
        ds = IndexedDataset(prefix)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["ShardEntry", "Manifest", "load_manifest", "ManifestError", "MANIFEST_NAME", "SPLITS",
           "FORMAT_NAME", "FORMAT_VERSION"]

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "halo-prep-manifest"
FORMAT_VERSION = 1
SPLITS = ("train", "validation")


class ManifestError(ValueError):
    """A missing or invalid manifest, or a split it does not have; the message says what to do."""


@dataclass
class ShardEntry:
    prefix: str  # relative to the data directory, without .bin/.idx
    num_tokens: int
    num_docs: int
    checksums: dict[str, str]  # {"bin": "sha256:<hex>", "idx": "sha256:<hex>"}


@dataclass
class Manifest:
    root: Path
    tokenizer: str  # what to pass to get_tokenizer(): a name, or an absolute BPE file path
    vocab_size: int
    eod_id: int
    dtype: str  # numpy dtype name of the tokens: "uint16" or "int32"
    splits: dict[str, list[ShardEntry]]
    tokenizer_name: str = ""  # canonical tokenizer name (same as `tokenizer` for named ones)
    extra: dict = field(default_factory=dict)  # everything else in the file (inputs, version, stats)

    def shard_prefixes(self, split: str) -> list[Path]:
        """Absolute shard prefixes of ``split`` ("train" or "validation"), in order."""
        if split not in self.splits:
            raise ManifestError(
                f"{self.root / MANIFEST_NAME} has no split {split!r} (it has: {', '.join(self.splits) or 'none'})")
        if not self.splits[split]:
            if split == "train":
                why = ("every document went to the validation split, or there were too few documents; re-run "
                       "halo-prep with a smaller --val-fraction (the default is 0.01) or more input")
            else:
                why = ("prepared with --val-fraction 0, or too few documents; re-run halo-prep with "
                       "--val-fraction > 0 if you need it")
            raise ManifestError(f"{self.root / MANIFEST_NAME}: split {split!r} has no shards ({why})")
        return [self.root / e.prefix for e in self.splits[split]]

    def num_tokens(self, split: str) -> int:
        return sum(e.num_tokens for e in self.splits.get(split, []))

    def num_docs(self, split: str) -> int:
        return sum(e.num_docs for e in self.splits.get(split, []))

    def to_json(self) -> dict:
        """The manifest as written to disk (``root`` is where it lies, so it is not stored)."""
        out = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION}
        out.update(self.extra)
        out.update({
            "tokenizer": self.tokenizer,
            "tokenizer_name": self.tokenizer_name or self.tokenizer,
            "vocab_size": self.vocab_size,
            "eod_id": self.eod_id,
            "dtype": self.dtype,
            "splits": {s: [asdict(e) for e in entries] for s, entries in self.splits.items()},
        })
        return out


def _fail(path: Path, why: str) -> ManifestError:
    return ManifestError(
        f"{path}: {why}. Make the data directory with halo-prep "
        f"(`halo-prep INPUT... -o {path.parent} --tokenizer NAME`), or point at one it made.")


def load_manifest(data_dir) -> Manifest:
    """Read ``data_dir/manifest.json`` (``data_dir`` may also be the manifest file itself)."""
    root = Path(data_dir)
    if root.name == MANIFEST_NAME and root.is_file():
        root = root.parent
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise _fail(path, f"data directory {root} does not exist")
    if not path.is_file():
        raise _fail(path, "no manifest (an unfinished halo-prep run writes it last: re-run the same "
                          "command to finish)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(path, f"not valid JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        raise _fail(path, f"not a halo-prep manifest (no \"format\": \"{FORMAT_NAME}\")")
    if raw.get("format_version") != FORMAT_VERSION:
        raise _fail(path, f"manifest format version {raw.get('format_version')!r}; this halo-pretrain "
                          f"reads version {FORMAT_VERSION}")
    try:
        splits = {
            str(name): [ShardEntry(prefix=str(e["prefix"]), num_tokens=int(e["num_tokens"]),
                                   num_docs=int(e["num_docs"]), checksums=dict(e.get("checksums", {})))
                        for e in entries]
            for name, entries in raw["splits"].items()
        }
        known = {"format", "format_version", "tokenizer", "tokenizer_name", "vocab_size", "eod_id",
                 "dtype", "splits"}
        return Manifest(
            root=root.resolve(),
            tokenizer=str(raw["tokenizer"]),
            tokenizer_name=str(raw.get("tokenizer_name", raw["tokenizer"])),
            vocab_size=int(raw["vocab_size"]),
            eod_id=int(raw["eod_id"]),
            dtype=str(raw["dtype"]),
            splits=splits,
            extra={k: v for k, v in raw.items() if k not in known},
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise _fail(path, f"missing or invalid field ({type(e).__name__}: {e})") from None
