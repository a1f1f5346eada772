"""Packed training samples over prepared shards, in a deterministic global order.

A *sample* is seq_len + 1 consecutive tokens of one shard (inputs are the first seq_len, targets the
last seq_len); sample i of a shard starts at token i * seq_len, so neighbouring samples share one
token and documents are packed across EOD tokens. Samples never cross shards.

Order. Each dataset (one prepared directory's split) has n samples per epoch; its j-th sample in
training order is perm_e[j mod n] of epoch e = j div n, perm_e a permutation seeded by
(seed, dataset index, e). Several datasets are blended by weight w_d (normalised to sum 1): the j-th
sample of dataset d is due at time (j + 0.5) / w_d, and the global stream lists all samples by
due time (ties by dataset index). Every dataset thus gets round(k * w_d) +- 1 of the first k samples.

Position. Training is positioned by a single integer, `consumed_samples` c (global samples used by
all completed optimizer steps). In the step that starts at c, with micro-batch size b, world size W
and micro-step m (0 <= m < grad_accum), rank r reads the global samples

    c + m * b * W + r * b + i,   i = 0 .. b - 1.

So each step consumes the contiguous range [c, c + b * grad_accum * W), whatever W is, and a
restart at c on any world size continues with exactly the next sample.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from ..fileio import sha256_file
from .indexed import IndexedDataset
from .manifest import MANIFEST_NAME, ManifestError, ShardEntry, load_manifest


class ShardError(ValueError):
    """A shard that does not match its manifest, or holds a token outside the vocabulary: corrupted or
    changed after halo-prep. The message names the file and what to do."""


def _fix_hint(root: Path) -> str:
    return f"check the directory with `halo-prep verify {root}` and prepare it again"


def check_shard(shard: IndexedDataset, entry: ShardEntry, manifest) -> None:
    """The shard's dtype, token and document counts and .bin size against its manifest entry (cheap:
    the index only)."""
    where = manifest.root / MANIFEST_NAME
    expected = entry.num_tokens * shard.dtype.itemsize
    found = [(shard.dtype.name, manifest.dtype, "dtype"), (shard.num_tokens, entry.num_tokens, "tokens"),
             (shard.num_docs, entry.num_docs, "documents"), (os.path.getsize(shard.bin_path), expected, "bytes")]
    for got, want, what in found:
        if got != want:
            raise ShardError(f"{shard.bin_path}: {got} {what}, {where} says {want}: the shard was changed or "
                             f"replaced after halo-prep; {_fix_hint(manifest.root)}")


class PackedDataset:
    """One prepared directory's split as packed samples of seq_len + 1 tokens."""

    def __init__(self, data_dir: str | Path, split: str, seq_len: int, seed: int = 0, index: int = 0,
                 shuffle: bool = True):
        self.data_dir, self.split, self.seq_len = Path(data_dir), split, seq_len
        self.seed, self.index, self.shuffle = seed, index, shuffle
        self.manifest = load_manifest(data_dir)
        self.shards = [IndexedDataset(str(p)) for p in self.manifest.shard_prefixes(split)]
        self.entries = self.manifest.splits[split]
        for shard, entry in zip(self.shards, self.entries):
            check_shard(shard, entry, self.manifest)
        per_shard = [max(0, (int(s.num_tokens) - 1) // seq_len) for s in self.shards]
        self.starts = np.concatenate([[0], np.cumsum(per_shard, dtype=np.int64)])
        self.num_samples = int(self.starts[-1])
        self._perm_epoch, self._perm = None, None

    def __len__(self) -> int:
        return self.num_samples

    def raw(self, i: int) -> np.ndarray:
        """Sample i in file order (no shuffle); a token outside the vocabulary is a ShardError naming it."""
        shard = int(np.searchsorted(self.starts, i, side="right")) - 1
        start = (i - int(self.starts[shard])) * self.seq_len
        tokens = np.asarray(self.shards[shard].tokens[start:start + self.seq_len + 1], dtype=np.int64)
        vocab = self.manifest.vocab_size
        if len(tokens) and (int(tokens.max()) >= vocab or int(tokens.min()) < 0):
            bad = int(np.argmax((tokens >= vocab) | (tokens < 0)))
            raise ShardError(f"{self.shards[shard].bin_path}: token {int(tokens[bad])} at position {start + bad} is "
                             f"outside the vocabulary 0..{vocab - 1} of {self.manifest.root / MANIFEST_NAME}: the "
                             f"shard is corrupted; {_fix_hint(self.manifest.root)}")
        return tokens

    def checksummed_files(self) -> list[tuple[Path, str]]:
        """(file, "sha256:<hex>" the manifest recorded) of every shard file with a recorded checksum."""
        return [(Path(f"{self.manifest.root / entry.prefix}.{suffix}"), want)
                for entry in self.entries for suffix, want in sorted(entry.checksums.items())]

    def permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            rng = np.random.default_rng([self.seed, self.index, epoch])
            self._perm, self._perm_epoch = rng.permutation(self.num_samples), epoch
        return self._perm

    def file_index(self, j: int) -> int:
        """The file-order sample behind the j-th sample in training order."""
        epoch, pos = divmod(j, self.num_samples)
        return int(self.permutation(epoch)[pos]) if self.shuffle else pos

    def sample(self, j: int) -> np.ndarray:
        return self.raw(self.file_index(j))


def checksum_problems(datasets: list[PackedDataset], rank: int = 0, world_size: int = 1) -> list[str]:
    """This rank's share (every world_size-th file) of the shard files against the manifest's SHA-256."""
    files = sorted({f for d in datasets for f in d.checksummed_files()})
    problems = []
    for path, want in files[rank::world_size]:
        got = "sha256:" + sha256_file(path)
        if got != want:
            root = path.parent
            problems.append(f"{path}: checksum {got} differs from the manifest's {want}: the shard is corrupted "
                            f"or was changed after halo-prep; {_fix_hint(root)}")
    return problems


class SampleStream:
    """The global sample order over one or more weighted datasets (see the module docstring)."""

    def __init__(self, datasets: list[PackedDataset], weights: list[float] | None = None):
        if not datasets:
            raise ValueError("no datasets to read")
        weights = [1.0] * len(datasets) if weights is None else [float(w) for w in weights]
        total = sum(weights)
        self.datasets, self.weights = datasets, [w / total for w in weights]

    def _due(self, d: int, j) -> np.ndarray:
        return (np.asarray(j, dtype=np.float64) + 0.5) / self.weights[d]

    def _first_due_at_or_after(self, d: int, t: float) -> int:
        """How many samples of dataset d are due strictly before time t."""
        j = max(0, math.ceil(t * self.weights[d] - 0.5))
        while j > 0 and self._due(d, j - 1) >= t:
            j -= 1
        while self._due(d, j) < t:
            j += 1
        return j

    def locate(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(dataset index, sample index within it) of global samples start .. start + count - 1."""
        if len(self.datasets) == 1:
            return np.zeros(count, dtype=np.int64), np.arange(start, start + count, dtype=np.int64)
        n = len(self.datasets)
        t_lo, t_hi = max(0.0, start - n - 1.0), start + count + n + 1.0
        firsts = [self._first_due_at_or_after(d, t_lo) for d in range(n)]
        lasts = [self._first_due_at_or_after(d, t_hi) for d in range(n)]
        ds = np.concatenate([np.full(b - a, d, dtype=np.int64) for d, (a, b) in enumerate(zip(firsts, lasts))])
        js = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in zip(firsts, lasts)])
        due = np.concatenate([self._due(d, np.arange(a, b)) for d, (a, b) in enumerate(zip(firsts, lasts))])
        order = np.lexsort((ds, due))
        offset = start - sum(firsts)  # sum(firsts) samples precede the first one listed here
        assert 0 <= offset and offset + count <= len(order), "blend window too small"
        pick = order[offset:offset + count]
        return ds[pick], js[pick]

    def samples(self, start: int, count: int) -> np.ndarray:
        ds, js = self.locate(start, count)
        return np.stack([self.datasets[d].sample(int(j)) for d, j in zip(ds, js)])


def rank_sample_start(consumed: int, rank: int, world_size: int, micro_batch_size: int, micro_step: int) -> int:
    """First global sample of `rank`'s micro-batch `micro_step` in the step that starts at `consumed`."""
    return consumed + micro_step * micro_batch_size * world_size + rank * micro_batch_size


class TrainLoader:
    """Micro-batches of (input_ids, labels) for one rank, addressed by consumed_samples."""

    def __init__(self, stream: SampleStream, micro_batch_size: int, rank: int, world_size: int):
        self.stream, self.micro_batch_size, self.rank, self.world_size = stream, micro_batch_size, rank, world_size

    def sample_indices(self, consumed: int, micro_step: int) -> list[int]:
        start = rank_sample_start(consumed, self.rank, self.world_size, self.micro_batch_size, micro_step)
        return list(range(start, start + self.micro_batch_size))

    def micro_batch(self, consumed: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = rank_sample_start(consumed, self.rank, self.world_size, self.micro_batch_size, micro_step)
        tokens = torch.from_numpy(self.stream.samples(start, self.micro_batch_size))
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def open_stream(sources: list[tuple[str, float]], split: str, seq_len: int, seed: int, shuffle: bool,
                model_vocab_size: int | None = None) -> SampleStream:
    """A SampleStream over prepared directories [(path, weight)], checked against the model's vocabulary."""
    datasets, tokenizer = [], None
    for index, (path, _) in enumerate(sources):
        try:
            ds = PackedDataset(path, split, seq_len, seed=seed, index=index, shuffle=shuffle)
        except ManifestError:
            if split == "train":
                raise
            continue  # no shards of this split here (e.g. no validation split): use the others
        m = ds.manifest
        if model_vocab_size is not None and m.vocab_size > model_vocab_size:
            raise ValueError(f"{path}: the data's vocab_size={m.vocab_size} (tokenizer {m.tokenizer!r}) is larger "
                             f"than the model's vocab_size={model_vocab_size}; set model.vocab_size >= "
                             f"{m.vocab_size} or use a preset made for this tokenizer")
        if tokenizer is not None and m.tokenizer != tokenizer:
            raise ValueError(f"{path}: tokenizer {m.tokenizer!r} differs from {sources[0][0]}'s {tokenizer!r}; "
                             "blended datasets must share one tokenizer")
        tokenizer = m.tokenizer
        if split == "train" and len(ds) == 0:
            total = sum(int(s.num_tokens) for s in ds.shards)
            raise ValueError(f"{path}: the train split holds {total} tokens, fewer than one sample of "
                             f"seq_len + 1 = {seq_len + 1}; prepare more data or shorten train.seq_len")
        datasets.append(ds)
    if split != "train":
        kept = [d for d in datasets if len(d)]
        return SampleStream(kept, [sources[d.index][1] for d in kept]) if kept else None
    return SampleStream(datasets, [w for _, w in sources])
