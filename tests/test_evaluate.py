"""halo-eval: perplexity counts every token once; probes place needles where they say; the scorer counts exactly."""

import json
import math
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from halo_pretrain.config import HaloConfig
from halo_pretrain.data.indexed import IndexedDataset
from halo_pretrain.data.manifest import load_manifest
from halo_pretrain.data.tokenizer import get_tokenizer
from halo_pretrain.evaluate.cli import main as eval_main
from halo_pretrain.evaluate.perplexity import perplexity
from halo_pretrain.evaluate.probes import (TASKS, accuracy_table, heatmap_png, is_correct, make_example,
                                           make_suite, run_suite, table_markdown)
from halo_pretrain.model import HaloSModel
from train_utils import make_prepared_dir

BYTE = get_tokenizer("byte")
CONFIG = dict(vocab_size=320, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, num_globals=2,
              local_window=16, num_random=2, max_seq_len=1024)


def small_model(**overrides):
    torch.manual_seed(0)
    return HaloSModel(HaloConfig(**{**CONFIG, **overrides})).eval()


def occurrences(seq, pattern):
    return [i for i in range(len(seq) - len(pattern) + 1) if seq[i:i + len(pattern)] == pattern]


# ---- the probe generator --------------------------------------------------------------------------
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [300, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_the_needle_is_where_the_example_says(task, length, depth):
    ex = make_example(task, length, depth, BYTE.encode, seed=3)
    assert len(ex.tokens) + len(ex.answer) == length
    assert ex.tokens[ex.needle_start: ex.needle_start + len(ex.needle)] == ex.needle
    before = ex.needle_start - ex.haystack_start
    assert abs(before - depth * ex.haystack_tokens) <= 0.5
    after = len(ex.tokens) - ex.needle_start - len(ex.needle)  # filler after the needle, then the question
    assert after >= ex.haystack_tokens - before
    assert occurrences(ex.tokens, ex.needle)[0] == ex.needle_start


def test_each_task_asks_for_what_its_needle_holds():
    text = {t: make_example(t, 600, 0.5, BYTE.encode, seed=1) for t in TASKS}
    ex = text["passkey"]
    key = BYTE.decode(ex.answer).strip()
    assert key.isdigit() and len(key) == 5
    prompt = BYTE.decode(ex.tokens)
    assert prompt.count(key) == 2 and prompt.endswith("The pass key is")  # twice, both inside the needle
    assert BYTE.decode(ex.needle).count(key) == 2
    ex = text["needle"]
    city = BYTE.decode(ex.tokens).rsplit("for ", 1)[1].split(" ")[0]
    assert BYTE.decode(ex.tokens).count(f"for {city} is{BYTE.decode(ex.answer)}") == 1
    ex = text["kv"]
    key = BYTE.decode(ex.tokens).rsplit("\n", 1)[1]  # "abcde:"
    assert BYTE.decode(ex.needle) == f"\n{key}{BYTE.decode(ex.answer)}"
    assert BYTE.decode(ex.tokens).count(f"\n{key}") == 2  # the pair and the question
    ex = text["copy"]
    assert ex.tokens[-8:] == ex.needle[:8] and ex.answer == ex.needle[8:]
    assert len(occurrences(ex.tokens, ex.needle[:8])) == 2  # in the list and as the cue


def test_examples_are_deterministic_in_the_seed():
    a = make_suite(TASKS, [400], [0.5], 2, BYTE.encode, seed=5)
    b = make_suite(TASKS, [400], [0.5], 2, BYTE.encode, seed=5)
    c = make_suite(TASKS, [400], [0.5], 2, BYTE.encode, seed=6)
    assert [x.tokens for x in a] == [x.tokens for x in b]
    assert all(x.tokens != y.tokens for x, y in zip(a, c))
    assert a[0].tokens != a[1].tokens  # two samples differ


def test_too_short_a_length_and_unknown_task_are_clear_errors():
    with pytest.raises(ValueError, match=r"probe passkey: length 100 is too short.*take \d+ tokens"):
        make_example("passkey", 100, 0.5, BYTE.encode)
    with pytest.raises(ValueError, match=r"probe task 'haystack' is unknown"):
        make_example("haystack", 500, 0.5, BYTE.encode)


# ---- the scorer and the table ---------------------------------------------------------------------
def induction_oracle(window):
    """Answers as a perfect copier that sees only the last `window` tokens of each prompt."""
    def generate_fn(prompts, n):
        outs = []
        for p in prompts:
            seen = p[-window:]
            cue = seen[-6:]
            hits = [i for i in occurrences(seen[:-6], cue)]
            outs.append(seen[hits[-1] + 6: hits[-1] + 6 + n] if hits else [0] * n)
        return outs
    return generate_fn


def test_a_perfect_copier_scores_100_percent_on_every_task():
    examples = make_suite(TASKS, [300, 700], [0.0, 0.5, 1.0], 2, BYTE.encode, seed=2)
    generations = run_suite(examples, induction_oracle(10**9), batch_size=5)
    table = accuracy_table(examples, generations)
    for task in TASKS:
        for n in ("300", "700"):
            for d in ("0.0", "0.5", "1.0"):
                assert table[task][n][d] == {"correct": 2, "total": 2, "accuracy": 1.0}


def test_a_copier_with_a_short_window_scores_exactly_the_needles_inside_it():
    examples = make_suite(["kv", "copy"], [400, 900], [0.0, 0.25, 0.5, 0.75, 1.0], 3, BYTE.encode, seed=4)
    generations = run_suite(examples, induction_oracle(300), batch_size=4)
    table = accuracy_table(examples, generations)
    visible = [ex.needle_start >= len(ex.tokens) - 300 for ex in examples]
    assert 0 < sum(visible) < len(examples)
    for ex, gen, vis in zip(examples, generations, visible):
        assert is_correct(ex, gen) == vis
        cell = table[ex.task][str(ex.length)][str(ex.depth)]
        expected = sum(v for e, v in zip(examples, visible) if (e.task, e.length, e.depth) == (ex.task, ex.length, ex.depth))
        assert cell["correct"] == expected and cell["total"] == 3


def test_the_scorer_counts_exactly():
    ex = make_example("passkey", 400, 0.5, BYTE.encode)
    wrong_last = ex.answer[:-1] + [(ex.answer[-1] + 1) % 256]
    cases = [(ex.answer, True), (ex.answer + [46, 10], True), (ex.answer[:-1], False), (wrong_last, False),
             ([], False), ([32] + ex.answer, False)]
    for generated, expected in cases:
        assert is_correct(ex, generated) is expected
    table = accuracy_table([ex] * len(cases), [g for g, _ in cases])
    assert table["passkey"]["400"]["0.5"] == {"correct": 2, "total": 6, "accuracy": 2 / 6}
    markdown = table_markdown(table)
    assert "| 0.5 | 33% | 33% |" in markdown


def test_heatmap_is_a_png_of_the_expected_size(tmp_path):
    examples = make_suite(["passkey", "copy"], [300, 500], [0.0, 1.0], 1, BYTE.encode)
    table = accuracy_table(examples, run_suite(examples, induction_oracle(10**9)))
    heatmap_png(table, tmp_path / "h.png")
    data = (tmp_path / "h.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (900, 400)  # 4.5 in per task x 4 in, 100 dpi


# ---- perplexity -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    docs = [f"document {i}: " + "some text to predict. " * (3 + i % 7) for i in range(40)]
    return make_prepared_dir(tmp_path_factory.mktemp("data"), docs[:30], docs[30:], docs_per_shard=4)


def test_a_uniform_model_has_perplexity_equal_to_its_vocabulary_and_every_token_counts(data_dir):
    model = small_model(tie_embeddings=False)
    torch.nn.init.zeros_(model.lm_head.weight)
    result = perplexity(model, data_dir, seq_len=37, batch_size=3)
    shards = [IndexedDataset(p).tokens for p in load_manifest(data_dir).shard_prefixes("validation")]
    assert len(shards) == 3
    assert result["tokens"] == sum(len(s) - 1 for s in shards)
    assert result["windows"] == sum(math.ceil((len(s) - 1) / 37) for s in shards)
    assert abs(result["loss"] - math.log(320)) < 1e-6
    assert abs(result["perplexity"] - 320) < 1e-3


def test_perplexity_equals_the_loss_of_one_forward_pass_over_each_shard(data_dir):
    model = small_model()
    result = perplexity(model, data_dir, seq_len=1024)
    assert result["windows"] == 3  # every shard fits in one window
    total, count = 0.0, 0
    with torch.no_grad():
        for prefix in load_manifest(data_dir).shard_prefixes("validation"):
            x = torch.from_numpy(np.asarray(IndexedDataset(prefix).tokens, dtype=np.int64))[None]
            total += float(F.cross_entropy(model(x[:, :-1])[0], x[0, 1:], reduction="sum"))
            count += x.shape[1] - 1
    assert abs(result["loss"] - total / count) < 1e-5
    short = perplexity(model, data_dir, seq_len=64, batch_size=2)  # windows: a different cut of the same tokens
    assert short["tokens"] == count and short["loss"] != result["loss"]
    quick = perplexity(model, data_dir, seq_len=64, max_tokens=100)
    assert 100 <= quick["tokens"] < 100 + 64


def test_perplexity_refuses_data_of_a_larger_vocabulary(data_dir):
    with pytest.raises(ValueError, match=r"vocab_size 257 .*larger than the model's vocab_size=200"):
        perplexity(small_model(vocab_size=200), data_dir)


# ---- the CLI --------------------------------------------------------------------------------------
def test_halo_eval_writes_the_table_heatmap_and_perplexity(tmp_path, data_dir, capsys, monkeypatch):
    """The CLI end to end, checked against what it should have computed: perplexity as perplexity() gives it,
    the examples make_suite builds, and the scores of a generator whose right answers are known (a copier
    that sees the last 150 tokens of each prompt answers exactly the needles inside them)."""
    import halo_pretrain.evaluate.cli as cli

    model_dir = tmp_path / "model"
    small_model().save_pretrained(model_dir)
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer": "byte", "data": str(data_dir)}))
    copier = induction_oracle(150)
    calls = []

    def generate(model, prompts, n, temperature):
        assert temperature == 0 and isinstance(model, HaloSModel)  # greedy, on the loaded model
        calls.append(len(prompts))
        return copier(prompts, n)

    monkeypatch.setattr(cli, "generate", generate)
    out = tmp_path / "eval"
    assert eval_main([str(model_dir), "-o", str(out), "--lengths", "300,512", "--depths", "0,0.5,1",
                      "--samples", "2", "--max-tokens", "200", "--seed", "3"]) == 0
    report = json.loads((out / "eval.json").read_text())
    direct = perplexity(small_model(), data_dir, max_tokens=200)
    assert report["perplexity"] == direct and direct["tokens"] >= 200
    expected = make_suite(TASKS, [300, 512], [0.0, 0.5, 1.0], 2, BYTE.encode, seed=3)
    answers = copier([ex.tokens for ex in expected], 16)
    right = [is_correct(ex, a) for ex, a in zip(expected, answers)]
    assert 0 < sum(right) < len(right)  # some needles are inside the copier's window, some are not
    assert len(report["probes"]["examples"]) == len(expected) == 48 and sum(calls) == 48
    for got, ex, ok in zip(report["probes"]["examples"], expected, right):
        assert got == {**ex.summary(), "generated": copier([ex.tokens], len(ex.answer))[0], "correct": ok}
    table = report["probes"]["table"]
    assert table == accuracy_table(expected, [copier([ex.tokens], len(ex.answer))[0] for ex in expected])
    for ex, ok in zip(expected, right):
        cell = table[ex.task][str(ex.length)][str(ex.depth)]
        assert cell["total"] == 2 and cell["correct"] == sum(
            r for e, r in zip(expected, right) if (e.task, e.length, e.depth) == (ex.task, ex.length, ex.depth))
    assert (out / "probes.md").read_text() == table_markdown(table) + "\n"
    assert (out / "probes_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert f"loss {direct['loss']:.4f}" in printed and table_markdown(table) in printed


def test_halo_eval_refuses_a_probe_longer_than_max_seq_len(tmp_path):
    model_dir = tmp_path / "model"
    small_model().save_pretrained(model_dir)
    with pytest.raises(SystemExit, match=r"probe length 1100 exceeds the model's max_seq_len=1024"):
        eval_main([str(model_dir), "--no-perplexity", "--tokenizer", "byte", "--lengths", "300,1100"])
