"""The trainer's console: plain lines for log files, a bar on a terminal, validation and a summary on both."""

from __future__ import annotations

import io

import pytest

from halo_pretrain.train.metrics import Console, format_duration, read_metrics, truncate_metrics
from halo_pretrain.train.run_config import ConfigError, load_run_config


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def record(step: int, **extra) -> dict:
    """Step s: loss 5 - 0.1 s, 1000 tokens in (1 + s % 2) seconds."""
    seconds = 1.0 + step % 2
    return {"step": step, "loss": 5.0 - 0.1 * step, "lr": 1e-3 / step, "grad_norm": 0.1 * step,
            "tokens_per_s": 1000.0 / seconds, "step_time": seconds, "mfu": 0.01 * step, "mem_gb": 0.25 * step,
            "tokens": 1000 * step, **extra}


def run(console: Console, clock: Clock, steps, val_at=(), skipped=()) -> None:
    for step in steps:
        clock.now += 3.0  # 3 s of wall time a step, evaluations and checkpoints included
        extra = {"val_loss": 4.0 - step / 100, "val_ppl": 54.6} if step in val_at else {}
        r = record(step, **extra)
        if step in skipped:
            r.update(loss=None, grad_norm=None)
        console.log(r)
    console.close()


def test_plain_lines_every_interval_with_means_over_it_validation_and_a_summary():
    out, clock = io.StringIO(), Clock()  # not a terminal: a log file, Slurm, nohup
    console = Console(total_steps=8, start_step=3, interval=3, progress_bar=True, stream=out, clock=clock)
    run(console, clock, range(4, 9), val_at={6, 8}, skipped={5})
    lines = out.getvalue().splitlines()
    # steps 4..6 (to a multiple of 3), then 7..8 (to the last step); step 5 was skipped
    assert lines[0] == ("[halo-train] step 6/8 | loss 4.5000 | lr 1.67e-04 | gnorm 0.500 | 750 tok/s | mfu 5.0% "
                        "| mem 1.5G | 1 skipped | eta 6s")
    assert lines[1] == "[halo-train] step 6/8 validation: loss 3.9400, ppl 54.60"
    assert lines[2] == ("[halo-train] step 8/8 | loss 4.2500 | lr 1.25e-04 | gnorm 0.750 | 667 tok/s | mfu 7.3% "
                        "| mem 2.0G | eta 0s")
    assert lines[3] == "[halo-train] step 8/8 validation: loss 3.9200, ppl 54.60"
    assert lines[4] == ("[halo-train] summary: ran steps 4-8 of 8 in 15s; 5,000 tokens at 714 tok/s; last loss "
                        "4.2000; validation loss 3.9200 at step 8; peak memory 2.0G")
    assert len(lines) == 5 and "\r" not in out.getvalue()


def test_a_terminal_gets_the_bar_and_still_the_validation_and_summary_lines():
    out, clock = Terminal(), Clock()
    console = Console(total_steps=6, start_step=0, interval=2, progress_bar=True, stream=out, clock=clock)
    run(console, clock, range(1, 7), val_at={3, 6})
    text = out.getvalue()
    assert "train:" in text and "\r" in text  # tqdm redraws in place
    assert "| loss" not in text  # no plain lines under a bar
    assert "[halo-train] step 3/6 validation: loss 3.9700, ppl 54.60" in text
    assert ("[halo-train] summary: ran steps 1-6 of 6 in 18s; 6,000 tokens at 667 tok/s; last loss 4.4000; "
            "validation loss 3.9400 at step 6; peak memory 1.5G") in text


def test_progress_bar_false_keeps_plain_lines_on_a_terminal():
    out, clock = Terminal(), Clock()
    console = Console(total_steps=4, start_step=0, interval=2, progress_bar=False, stream=out, clock=clock)
    run(console, clock, range(1, 5), val_at={2})
    lines = out.getvalue().splitlines()
    assert [line.split(" | ")[0] for line in lines] == [
        "[halo-train] step 2/4", "[halo-train] step 2/4 validation: loss 3.9800, ppl 54.60",
        "[halo-train] step 4/4", "[halo-train] summary: ran steps 1-4 of 4 in 12s; 4,000 tokens at 667 tok/s; "
                                 "last loss 4.6000; validation loss 3.9800 at step 2; peak memory 1.0G"]
    assert lines[0].endswith("| eta 6s")  # (3 s a step since step 1) x 2 steps left


def test_best_validation_is_named_when_the_last_is_worse_and_no_summary_without_steps():
    out, clock = io.StringIO(), Clock()
    console = Console(total_steps=4, start_step=0, interval=10, progress_bar=False, stream=out, clock=clock)
    for step, val in ((2, 3.5), (4, 3.7)):
        console.log(record(step, val_loss=val, val_ppl=33.0))
    console.close()
    assert out.getvalue().splitlines()[-1].endswith(
        "validation loss 3.7000 at step 4 (best 3.5000 at step 2); peak memory 1.0G")
    idle = io.StringIO()
    Console(total_steps=4, start_step=4, interval=10, progress_bar=False, stream=idle).close()
    assert idle.getvalue() == ""


def test_format_duration():
    assert [format_duration(s) for s in (0, 59.4, 61, 3599, 3600, 7384)] == ["0s", "59s", "1m01s", "59m59s",
                                                                            "1h00m", "2h03m"]


def test_log_interval_is_a_typed_key(tmp_path):
    overrides = ["data.path=x", "train.seq_len=8", "train.micro_batch_size=1", "train.steps=1", "run.dir=r"]
    assert load_run_config(None, overrides).logging.log_interval == 10
    assert load_run_config(None, overrides + ["logging.log_interval=50"]).logging.log_interval == 50
    with pytest.raises(ConfigError, match=r"override 'logging.log_interval=0'.*greater than 0"):
        load_run_config(None, overrides + ["logging.log_interval=0"])


def test_metrics_readers_skip_the_line_a_live_trainer_is_still_writing(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 3.5}\n{"step": 2, "loss": 3.25}\n{"step": 3, "lo')
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 3.5}, {"step": 2, "loss": 3.25}]
    assert truncate_metrics(tmp_path, last_step=1) == 1
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 3.5}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
