"""The packed-sample loader: layout, deterministic order, blending, and positions by consumed_samples."""

from __future__ import annotations

import json

import numpy as np
import pytest

from halo_pretrain.data.loader import (PackedDataset, SampleStream, ShardError, TrainLoader, checksum_problems,
                                       open_stream, rank_sample_start)
from halo_pretrain.data.manifest import ManifestError
from train_utils import make_prepared_dir, record_checksums

SEQ = 8


def docs(n: int, length: int, tag: str) -> list[str]:
    return [f"{tag}{i:04d}" + "x" * (length - 5) for i in range(n)]


@pytest.fixture(scope="module")
def two_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    a = make_prepared_dir(root / "a", docs(40, 20, "a"), docs(3, 20, "v"), docs_per_shard=15)
    b = make_prepared_dir(root / "b", docs(25, 30, "b"), [], docs_per_shard=10)
    return a, b


def test_samples_are_seq_plus_one_windows_within_one_shard(two_dirs):
    ds = PackedDataset(two_dirs[0], "train", SEQ, shuffle=False)
    assert len(ds.shards) == 3
    expected = sum((int(s.num_tokens) - 1) // SEQ for s in ds.shards)
    assert len(ds) == expected
    first_of_shard1 = int(ds.starts[1])
    for i in (0, 1, first_of_shard1 - 1, first_of_shard1, len(ds) - 1):
        shard = int(np.searchsorted(ds.starts, i, side="right")) - 1
        local = i - int(ds.starts[shard])
        want = np.asarray(ds.shards[shard].tokens[local * SEQ: local * SEQ + SEQ + 1])
        np.testing.assert_array_equal(ds.raw(i), want)
        assert len(ds.raw(i)) == SEQ + 1
    # neighbouring samples share exactly one token (packed, nothing dropped between them)
    assert ds.raw(0)[-1] == ds.raw(1)[0]


def test_order_is_a_seeded_permutation_per_epoch(two_dirs):
    a1 = PackedDataset(two_dirs[0], "train", SEQ, seed=1)
    a1_again = PackedDataset(two_dirs[0], "train", SEQ, seed=1)
    a2 = PackedDataset(two_dirs[0], "train", SEQ, seed=2)
    n = len(a1)
    epoch0 = [a1.file_index(j) for j in range(n)]
    epoch1 = [a1.file_index(j) for j in range(n, 2 * n)]
    assert sorted(epoch0) == list(range(n)) and sorted(epoch1) == list(range(n))
    assert epoch0 != epoch1  # a fresh shuffle each epoch
    assert epoch0 == [a1_again.file_index(j) for j in range(n)]
    assert epoch0 != [a2.file_index(j) for j in range(n)]
    np.testing.assert_array_equal(a1.sample(3), a1.raw(epoch0[3]))


def brute_force_blend(weights: list[float], count: int) -> list[tuple[int, int]]:
    """The blend's definition, computed the slow way: sort every sample by due time (j + 0.5) / w."""
    total = sum(weights)
    items = []
    for d, w in enumerate(weights):
        for j in range(int(count * w / total) + 3):
            items.append(((j + 0.5) / (w / total), d, j))
    return [(d, j) for _, d, j in sorted(items)[:count]]


@pytest.mark.parametrize("weights", [[0.7, 0.3], [1.0, 2.0, 5.0], [1.0, 1.0]])
def test_blend_matches_its_definition_and_proportions(two_dirs, weights):
    a = PackedDataset(two_dirs[0], "train", SEQ)
    stream = SampleStream([a] * len(weights), weights)
    ds, js = stream.locate(0, 500)
    assert list(zip(ds.tolist(), js.tolist())) == brute_force_blend(weights, 500)
    norm = np.asarray(weights) / sum(weights)
    for k in (1, 7, 100, 500):
        counts = np.bincount(ds[:k], minlength=len(weights))
        assert np.all(np.abs(counts - k * norm) <= 1.0), (k, counts)
    # any window equals the same slice of the whole stream (what a resumed rank reads)
    for start, count in ((0, 3), (137, 9), (499, 1), (250, 250)):
        wd, wj = stream.locate(start, count)
        np.testing.assert_array_equal(wd, ds[start:start + count])
        np.testing.assert_array_equal(wj, js[start:start + count])


def test_blend_far_position_is_consistent(two_dirs):
    a = PackedDataset(two_dirs[0], "train", SEQ)
    stream = SampleStream([a, a, a], [0.2, 0.3, 0.5])
    start = 10**9 + 17
    ds, js = stream.locate(start, 50)
    for i in range(0, 50, 7):  # a window that starts later lands on the same samples
        d2, j2 = stream.locate(start + i, 1)
        assert (d2[0], j2[0]) == (ds[i], js[i])
    assert abs(int(js[ds == 2][0]) - 0.5 * start) < 3  # dataset 2 has had ~half of all samples


def test_rank_positions_cover_each_step_exactly_once_for_any_world_size(two_dirs):
    """Step at consumed c reads [c, c + mb*ga*W): the same samples whatever W (with the same global batch)."""
    a = PackedDataset(two_dirs[0], "train", SEQ, seed=3)
    stream = SampleStream([a])
    consumed = 0
    for world, mb, ga in ((2, 2, 2), (1, 2, 4), (4, 1, 2), (1, 8, 1), (2, 4, 1)):
        gbs = world * mb * ga
        seen = []
        for rank in range(world):
            loader = TrainLoader(stream, mb, rank, world)
            for m in range(ga):
                seen += loader.sample_indices(consumed, m)
        assert sorted(seen) == list(range(consumed, consumed + gbs)), (world, mb, ga)
        consumed += gbs
    # the formula in the docs, spelled out
    assert rank_sample_start(100, rank=1, world_size=2, micro_batch_size=3, micro_step=2) == 100 + 2 * 3 * 2 + 1 * 3
    loader = TrainLoader(stream, 2, rank=1, world_size=2)
    inputs, labels = loader.micro_batch(40, 1)
    rows = stream.samples(40 + 1 * 2 * 2 + 1 * 2, 2)
    np.testing.assert_array_equal(inputs.numpy(), rows[:, :-1])
    np.testing.assert_array_equal(labels.numpy(), rows[:, 1:])
    assert inputs.dtype == labels.dtype and str(inputs.dtype) == "torch.int64"


def test_open_stream_checks(two_dirs, tmp_path):
    a, b = two_dirs
    with pytest.raises(ValueError, match=r"vocab_size=257.*larger than the model's vocab_size=200"):
        open_stream([(str(a), 1.0)], "train", SEQ, 0, True, model_vocab_size=200)
    with pytest.raises(ManifestError, match="no manifest"):
        open_stream([(str(tmp_path), 1.0)], "train", SEQ, 0, True)
    with pytest.raises(ValueError, match=r"fewer than one sample of seq_len \+ 1 = 4097"):
        open_stream([(str(a), 1.0)], "train", 4096, 0, True)
    # b has no validation shards: validation comes from a alone; none at all -> None
    val = open_stream([(str(a), 1.0), (str(b), 1.0)], "validation", SEQ, 0, False)
    assert len(val.datasets) == 1 and val.datasets[0].data_dir == a
    assert open_stream([(str(b), 1.0)], "validation", SEQ, 0, False) is None
    other = make_prepared_dir(tmp_path / "g", docs(10, 20, "g"), [])
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["tokenizer"] = manifest["tokenizer_name"] = "gpt2"
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="must share one tokenizer"):
        open_stream([(str(a), 1.0), (str(other), 1.0)], "train", SEQ, 0, True)


def test_a_flipped_byte_fails_its_shards_checksum_on_exactly_one_rank(tmp_path):
    d = record_checksums(make_prepared_dir(tmp_path / "d", docs(20, 20, "d"), docs(3, 20, "v"), docs_per_shard=10))
    train, val = PackedDataset(d, "train", SEQ), PackedDataset(d, "validation", SEQ)
    assert len(train.checksummed_files()) == 4 and checksum_problems([train, val]) == []
    shard = d / "train_00001.bin"
    data = bytearray(shard.read_bytes())
    data[6] ^= 0x01  # a token's low bit: still inside the vocabulary, seen by the checksum only
    shard.write_bytes(bytes(data))
    train = PackedDataset(d, "train", SEQ)
    problems = checksum_problems([train, val])
    assert len(problems) == 1 and problems[0].startswith(f"{shard}: checksum sha256:")
    assert f"halo-prep verify {d}" in problems[0]
    shares = [checksum_problems([train, val], rank, 3) for rank in range(3)]  # the files shared out over 3 ranks
    assert sorted(len(s) for s in shares) == [0, 0, 1]


def test_a_shard_that_disagrees_with_its_manifest_is_refused_at_open(tmp_path):
    d = make_prepared_dir(tmp_path / "d", docs(20, 20, "d"), [], docs_per_shard=10)
    other = make_prepared_dir(tmp_path / "o", docs(15, 20, "o"), [], docs_per_shard=15)
    for suffix in ("bin", "idx"):  # another, consistent shard in its place: 15 documents of 21 tokens, not 10
        (d / f"train_00001.{suffix}").write_bytes((other / f"train_00000.{suffix}").read_bytes())
    with pytest.raises(ShardError, match=rf"{d}/train_00001.bin: 315 tokens, .*manifest.json says 210: the shard "
                                         rf"was changed or replaced after halo-prep; check the directory with "
                                         rf"`halo-prep verify {d}`"):
        PackedDataset(d, "train", SEQ)


def test_an_out_of_vocabulary_token_names_its_shard_and_position(tmp_path):
    d = make_prepared_dir(tmp_path / "d", docs(20, 20, "d"), [], docs_per_shard=10)
    shard = d / "train_00000.bin"
    tokens = np.fromfile(shard, dtype=np.uint16)
    tokens[19] = 60000
    tokens.tofile(shard)
    ds = PackedDataset(d, "train", SEQ, shuffle=False)  # sizes unchanged: opens
    ds.raw(0), ds.raw(1)  # samples 0 and 1 cover tokens 0..16
    with pytest.raises(ShardError, match=rf"{shard}: token 60000 at position 19 is outside the vocabulary 0..256"):
        ds.raw(2)


def test_a_train_split_left_empty_is_refused_at_prep_and_explained_at_train(tmp_path, capsys):
    from data_prep.cli import main

    text = tmp_path / "in.txt"
    text.write_text("some text\n" * 20)
    out = tmp_path / "out"
    assert main([str(text), "-o", str(out), "--tokenizer", "byte", "--val-fraction", "1.0", "--workers", "0",
                 "-q"]) == 2
    err = capsys.readouterr().err
    assert "--val-fraction must be within [0, 1), got 1.0: it would put every document in the validation split" in err
    assert not (out / "manifest.json").exists()
    only_val = make_prepared_dir(tmp_path / "v", [], docs(5, 20, "v"))
    with pytest.raises(ManifestError, match=r"split 'train' has no shards \(every document went to the validation "
                                            r"split.*smaller --val-fraction"):
        open_stream([(str(only_val), 1.0)], "train", SEQ, 0, True)
