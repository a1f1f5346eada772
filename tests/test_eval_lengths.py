"""halo-eval's default probe lengths: max_seq_len/8, /4, /2 and max_seq_len, as documented; a default
too short for a task is left out for that task only, and said so."""

from __future__ import annotations

import json

import pytest

from halo_pretrain.config import get_preset
from halo_pretrain.evaluate.cli import default_lengths
from halo_pretrain.evaluate.cli import main as eval_main
from halo_pretrain.model import HaloSModel


def test_default_lengths_are_the_documented_fractions():
    assert default_lengths(4096) == [512, 1024, 2048, 4096]
    assert default_lengths(256) == [32, 64, 128, 256]  # no floor: a quickstart model gets four lengths
    assert default_lengths(100) == [12, 25, 50, 100]
    assert default_lengths(2) == [1, 2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("model")
    HaloSModel(get_preset("tiny", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, local_window=8,
                          max_seq_len=256)).save_pretrained(out)
    return out


def test_a_256_token_model_is_probed_at_every_default_length_each_task_fits(model_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    assert eval_main([str(model_dir), "--no-perplexity", "--tokenizer", "byte", "--depths", "0,1", "--samples", "1",
                      "-o", str(out)]) == 0
    report = json.loads((out / "eval.json").read_text())
    table = report["probes"]["table"]
    # with bytes, kv's fixed text takes 82 tokens, passkey 196, copy 179, needle 200-209
    assert {task: list(by_length) for task, by_length in table.items()} == {
        "passkey": ["256"], "needle": ["256"], "kv": ["128", "256"], "copy": ["256"]}
    assert len(report["probes"]["examples"]) == 5 * 2
    printed = capsys.readouterr().out
    assert ("halo-eval: default lengths: kv at 32, 64 tokens (too short for its instruction, needle and question) "
            "left out") in printed
    assert "halo-eval: default lengths: passkey at 32, 64, 128 tokens" in printed
    assert report["probes"]["skipped"][0].startswith("passkey at 32, 64, 128 tokens")


def test_explicit_lengths_stay_strict_and_bad_tasks_stay_errors(model_dir):
    with pytest.raises(SystemExit, match=r"probe passkey: length 128 is too short"):
        eval_main([str(model_dir), "--no-perplexity", "--tokenizer", "byte", "--lengths", "128,256"])
    with pytest.raises(SystemExit, match=r"probe task 'passkeys' is unknown"):
        eval_main([str(model_dir), "--no-perplexity", "--tokenizer", "byte", "--probes", "passkeys"])
    small = HaloSModel(get_preset("tiny", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                  local_window=8, max_seq_len=64))
    small.save_pretrained(model_dir.parent / "short")
    with pytest.raises(SystemExit, match=r"every default probe length \(8, 16, 32, 64\) is too short for the "
                                         r"probes passkey; pass --lengths"):
        eval_main([str(model_dir.parent / "short"), "--no-perplexity", "--tokenizer", "byte", "--probes", "passkey"])
