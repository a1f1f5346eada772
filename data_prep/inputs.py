"""Input corpora: resolve INPUT arguments to sources, then stream their documents in a fixed order.

An INPUT is a file, a folder (walked recursively, sorted), a glob, a Hugging Face dataset saved
with ``save_to_disk`` (a folder), or ``hf:NAME[:CONFIG]`` (``datasets.load_dataset``). File kinds,
by extension (optionally ``.gz``):

* ``.txt``, every extension given with ``--ext`` (e.g. ``--ext .py``) and any other file named
  or matched by a glob: one file = one document;
* ``.jsonl``: one JSON object per line, the document is its ``--text-field``;
* ``.json``: a JSON array of objects (or strings), or JSON lines;
* ``.parquet``: the ``--text-field`` column, read in record batches.

A folder walk reads ``.txt`` and the data kinds below; with ``--ext`` it reads exactly the
extensions given (``--ext .py`` reads Python files, not the ``.json`` test data beside them).

Nothing loads a whole corpus: files are read one at a time, JSON lines one line at a time,
Parquet and Arrow one batch at a time (a ``.json`` array and a single text document are the
exceptions: they are one parse / one document).
"""

from __future__ import annotations

import fnmatch
import glob
import gzip
import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from typing import Iterator

__all__ = ["InputError", "Source", "ReadStats", "resolve_inputs", "iter_documents", "inputs_digest",
           "DEFAULT_TEXT_EXTS"]

DEFAULT_TEXT_EXTS = (".txt",)
_DATA_EXTS = (".jsonl", ".json", ".parquet")
_HF_DISK_MARKERS = ("dataset_dict.json", "state.json")


class InputError(ValueError):
    """Bad input: the message names the file (and line) and what to do about it."""


@dataclass(frozen=True)
class Source:
    kind: str  # "text" | "jsonl" | "json" | "parquet" | "hf-disk" | "hf-hub"
    path: str  # absolute file or folder path, or the dataset name for hf-hub
    config: str | None = None  # hf-hub configuration name


@dataclass
class ReadStats:
    files: int = 0
    documents: int = 0  # non-empty documents handed on
    empty_documents: int = 0
    bad_lines: int = 0
    bad_line_examples: list[str] = field(default_factory=list)
    skipped_files: int = 0  # files in walked folders with an extension we do not read

    def bad(self, where: str, why: str) -> None:
        self.bad_lines += 1
        if len(self.bad_line_examples) < 5:
            self.bad_line_examples.append(f"{where}: {why}")


def _strip_gz(name: str) -> tuple[str, bool]:
    return (name[:-3], True) if name.endswith(".gz") else (name, False)


def _kind_of(path: str) -> str:
    """jsonl, json or parquet by extension; any other file is one text document."""
    base, _ = _strip_gz(os.path.basename(path).lower())
    for ext in _DATA_EXTS:
        if base.endswith(ext):
            return ext[1:]
    return "text"


def _is_hf_disk(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, m)) for m in _HF_DISK_MARKERS)


def _walk_reads(path: str, walk_exts: tuple[str, ...] | None) -> bool:
    """Whether a folder walk reads this file: None reads .txt and the data kinds, else exactly walk_exts."""
    base, _ = _strip_gz(os.path.basename(path).lower())
    wanted = DEFAULT_TEXT_EXTS + _DATA_EXTS if walk_exts is None else walk_exts
    return any(base.endswith(e.lower()) for e in wanted)


def resolve_inputs(specs: list[str], text_exts: tuple[str, ...] | None = None,
                   stats: ReadStats | None = None, exclude: tuple[str, ...] = ()) -> list[Source]:
    """Turn INPUT arguments into an ordered, de-duplicated list of sources. ``text_exts`` (--ext):
    None, a folder walk reads .txt and the data kinds; else it reads only these extensions (as text,
    or by kind for .jsonl/.json/.parquet). Files named or matched by a glob are read whatever their
    extension. ``exclude``: shell patterns matched against absolute paths (folders end with "/");
    matches are not read."""
    if text_exts is not None:
        text_exts = tuple(e if e.startswith(".") else "." + e for e in text_exts)
    if not specs:
        raise InputError("no INPUT given: name files, folders, globs or hf:DATASET to read")
    out: list[Source] = []
    seen: set[tuple[str, str | None]] = set()

    def add(src: Source) -> None:
        key = (src.path, src.config)
        if key not in seen:
            seen.add(key)
            out.append(src)

    def excluded(path: str) -> bool:
        return any(fnmatch.fnmatchcase(path, pat) for pat in exclude)

    def add_file(path: str, explicit: bool) -> None:
        if excluded(os.path.abspath(path)):
            return
        if not explicit and not _walk_reads(path, text_exts):  # met while walking a folder
            if stats is not None:
                stats.skipped_files += 1
            return
        add(Source(_kind_of(path), os.path.abspath(path)))  # named or matched: the user chose it

    def add_path(path: str, explicit: bool) -> None:
        if _is_hf_disk(path):
            add(Source("hf-disk", os.path.abspath(path)))
        elif os.path.isdir(path):
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                                 and not excluded(os.path.abspath(os.path.join(root, d)) + "/"))
                for name in sorted(files):
                    if not name.startswith("."):
                        add_file(os.path.join(root, name), explicit=False)
        else:
            add_file(path, explicit)

    for spec in specs:
        if spec.startswith("hf:"):
            name, _, config = spec[3:].partition(":")
            if not name:
                raise InputError(f"{spec!r}: give a dataset name, e.g. hf:wikitext:wikitext-2-raw-v1")
            add(Source("hf-hub", name, config or None))
        elif os.path.exists(spec):
            add_path(spec, explicit=True)
        else:
            matches = sorted(glob.glob(spec, recursive=True))
            if not matches:
                raise InputError(f"input {spec!r} matched no file or folder")
            for m in matches:
                add_path(m, explicit=True)
    if not out:
        reads = ", ".join(text_exts) if text_exts is not None else ", ".join(DEFAULT_TEXT_EXTS + _DATA_EXTS)
        raise InputError(f"inputs {' '.join(specs)} hold no readable file (a folder walk reads {reads}; "
                         f"choose others with --ext)")
    return out


def inputs_digest(sources: list[Source]) -> str:
    """Identity of the input set: kind, path and size of each source, in order."""
    h = hashlib.sha256()
    for s in sources:
        size = os.path.getsize(s.path) if os.path.isfile(s.path) else -1
        h.update(f"{s.kind}\0{s.path}\0{s.config}\0{size}\n".encode())
    return h.hexdigest()


def _open_binary(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb", buffering=1 << 20)


def _decode(data: bytes, errors: str, where: str) -> str:
    try:
        return data.decode("utf-8", errors)
    except UnicodeDecodeError as e:
        raise InputError(f"{where}: not valid UTF-8 at byte {e.start} ({e.reason}); "
                         f"pass --errors replace to replace bad bytes with U+FFFD") from None


def _field_text(obj, text_field: str, where: str) -> str:
    if isinstance(obj, str):  # a JSON string is a document by itself
        return obj
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object with a {text_field!r} field, got {type(obj).__name__}")
    if text_field not in obj:
        keys = ", ".join(list(obj)[:10]) or "none"
        raise InputError(f"{where}: no field {text_field!r} (fields: {keys}); choose one with --text-field")
    text = obj[text_field]
    if not isinstance(text, str):
        raise InputError(f"{where}: field {text_field!r} is {type(text).__name__}, not a string")
    return text


def _iter_jsonl(f, path: str, text_field: str, errors: str, skip_bad: bool, stats: ReadStats,
                first_line: int = 1) -> Iterator[str]:
    for lineno, raw in enumerate(f, first_line):
        if not raw.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            line = _decode(raw, errors, where)
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{where}: malformed JSON ({e.msg} at column {e.colno}); "
                                 f"pass --skip-bad-lines to skip and count such lines") from None
            yield _field_text(obj, text_field, where)
        except InputError as e:
            if not skip_bad:
                raise
            stats.bad(where, str(e).split(": ", 1)[1])


def _iter_file(src: Source, text_field: str, errors: str, skip_bad: bool, stats: ReadStats) -> Iterator[str]:
    path = src.path
    try:
        if src.kind == "text":
            with _open_binary(path) as f:
                yield _decode(f.read(), errors, path)
        elif src.kind == "jsonl":
            with _open_binary(path) as f:
                yield from _iter_jsonl(f, path, text_field, errors, skip_bad, stats)
        elif src.kind == "json":
            with _open_binary(path) as f:
                head = f.read(4096)
                first = head.lstrip()[:1]
                if first == b"[":
                    data = head + f.read()
                    try:
                        items = json.loads(_decode(data, errors, path))
                    except json.JSONDecodeError as e:
                        raise InputError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
                    for i, obj in enumerate(items):
                        where = f"{path}[{i}]"
                        if isinstance(obj, str):
                            yield obj
                            continue
                        try:
                            yield _field_text(obj, text_field, where)
                        except InputError as e:
                            if not skip_bad:
                                raise
                            stats.bad(where, str(e).split(": ", 1)[1])
                else:
                    stream = io.BufferedReader(_Prepend(head, f), buffer_size=1 << 20)
                    yield from _iter_jsonl(stream, path, text_field, errors, skip_bad, stats)
        elif src.kind == "parquet":
            yield from _iter_parquet(path, text_field, skip_bad, stats)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise InputError(f"{path}: cannot read: {e}") from None


class _Prepend(io.RawIOBase):
    """A raw stream that yields ``head`` and then the rest of ``f``."""

    def __init__(self, head: bytes, f):
        self.head, self.f = head, f

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.head:
            n = min(len(b), len(self.head))
            b[:n] = self.head[:n]
            self.head = self.head[n:]
            return n
        data = self.f.read(len(b))
        b[:len(data)] = data
        return len(data)


def _iter_parquet(path: str, text_field: str, skip_bad: bool, stats: ReadStats) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{path}: not a readable Parquet file: {e}") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise InputError(f"{path}: no column {text_field!r} (columns: {', '.join(names[:10])}); "
                         f"choose one with --text-field")
    ftype = pf.schema_arrow.field(text_field).type
    if not (pa.types.is_string(ftype) or pa.types.is_large_string(ftype)):
        raise InputError(f"{path}: column {text_field!r} is {ftype}, not a string column")
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if text is None:
                where = f"{path} row {row}"
                if not skip_bad:
                    raise InputError(f"{where}: {text_field!r} is null; pass --skip-bad-lines to skip "
                                     f"and count such rows")
                stats.bad(where, f"{text_field!r} is null")
            else:
                yield text
            row += 1


def _iter_hf(src: Source, text_field: str, hf_split: str, streaming: bool, skip_bad: bool,
             stats: ReadStats) -> Iterator[str]:
    try:
        import datasets
    except ImportError:  # pragma: no cover - a dependency of the package
        raise InputError("reading Hugging Face datasets needs the `datasets` package") from None
    label = src.path if src.kind == "hf-disk" else f"hf:{src.path}" + (f":{src.config}" if src.config else "")
    try:
        if src.kind == "hf-disk":
            ds = datasets.load_from_disk(src.path)
            if isinstance(ds, datasets.DatasetDict):
                if hf_split not in ds:
                    raise InputError(f"{label}: no split {hf_split!r} (splits: {', '.join(ds)}); "
                                     f"choose one with --hf-split")
                ds = ds[hf_split]
        else:
            ds = datasets.load_dataset(src.path, src.config, split=hf_split, streaming=streaming)
    except InputError:
        raise
    except Exception as e:
        hint = ("" if src.kind == "hf-disk" else
                " (a dataset name needs the network or the Hugging Face cache; offline, save it with "
                "`datasets.Dataset.save_to_disk` elsewhere and pass that folder)")
        raise InputError(f"{label}: cannot load dataset: {type(e).__name__}: {e}{hint}") from None
    columns = ds.column_names
    if columns is not None and text_field not in columns:
        raise InputError(f"{label}: no column {text_field!r} (columns: {', '.join(columns[:10])}); "
                         f"choose one with --text-field")
    if isinstance(ds, datasets.Dataset):
        rows = (t for batch in ds.select_columns([text_field]).iter(batch_size=1000) for t in batch[text_field])
    else:
        rows = (ex.get(text_field) for ex in ds)
    for i, text in enumerate(rows):
        if not isinstance(text, str):
            where = f"{label} row {i}"
            why = f"{text_field!r} is {type(text).__name__}, not a string"
            if not skip_bad:
                raise InputError(f"{where}: {why}; pass --skip-bad-lines to skip and count such rows")
            stats.bad(where, why)
            continue
        yield text


def iter_documents(sources: list[Source], *, text_field: str = "text", errors: str = "strict",
                   skip_bad_lines: bool = False, hf_split: str = "train", streaming: bool = False,
                   stats: ReadStats | None = None) -> Iterator[str]:
    """Every non-empty document of ``sources``, in order. Empty (whitespace-only) ones are counted
    in ``stats.empty_documents`` and skipped."""
    stats = stats if stats is not None else ReadStats()
    for src in sources:
        stats.files += 1
        if src.kind in ("hf-disk", "hf-hub"):
            docs = _iter_hf(src, text_field, hf_split, streaming, skip_bad_lines, stats)
        else:
            docs = _iter_file(src, text_field, errors, skip_bad_lines, stats)
        for text in docs:
            if not text or text.isspace():
                stats.empty_documents += 1
                continue
            stats.documents += 1
            yield text
