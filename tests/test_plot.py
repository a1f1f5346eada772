"""halo-plot: valid PNGs of the expected size, every run on one figure, resumed steps counted once."""

import json
import math
import struct
import zlib

import numpy as np
import pytest

from halo_pretrain.plot import main, read_metrics, series
from halo_pretrain.train.checkpoint import TrainerState
from halo_pretrain.train.metrics import METRICS_FILE, truncate_metrics
from halo_pretrain.train.trainer import NonFinite, StepResult, step_record

SAMPLES, SEQ = 8, 64


def log_steps(directory, steps, loss_scale, val_every=5, skipped=(), state=None):
    """Append the lines the trainer writes for these steps: its own records (step_record), evaluation
    results in the step's line, a skipped step with loss null. Returns the trainer state after them."""
    directory.mkdir(parents=True, exist_ok=True)
    state = state or TrainerState()
    with open(directory / METRICS_FILE, "a") as f:
        for step in steps:
            state.step, state.consumed_samples, state.tokens = step, SAMPLES * step, SAMPLES * SEQ * step
            result = StepResult(loss_scale * 5 / math.sqrt(step), NonFinite.GRADIENT if step in skipped else None,
                                False, 1.0)
            record = step_record(state, result, 1e-3 * min(1, step / 5), 0.5 + step / 100, SAMPLES * SEQ, None)
            if step % val_every == 0:
                record["val_loss"], record["val_ppl"] = loss_scale * 5.5 / math.sqrt(step), 10.0
            f.write(json.dumps(record) + "\n")
    return state


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    ihdr = data[16:29]
    assert struct.unpack(">I", data[29:33])[0] == zlib.crc32(b"IHDR" + ihdr)
    assert data[-12:] == b"\x00\x00\x00\x00IEND\xaeB`\x82"
    return struct.unpack(">II", ihdr[:8])


def test_plots_are_valid_pngs_of_800_by_500_with_both_runs_drawn(tmp_path):
    import matplotlib.image

    log_steps(tmp_path / "halo", range(1, 31), 1.0, skipped={7})
    log_steps(tmp_path / "dense", range(1, 31), 1.2)
    out = tmp_path / "plots"
    assert main([str(tmp_path / "halo"), str(tmp_path / "dense"), "-o", str(out)]) == 0
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == sorted(f"{m}_vs_{x}.png" for m in ("loss", "val_loss", "tokens_per_s", "lr")
                           for x in ("step", "tokens"))
    for p in out.glob("*.png"):
        assert png_size(p) == (800, 500)
    pixels = matplotlib.image.imread(out / "val_loss_vs_tokens.png")[..., :3]
    assert pixels.shape == (500, 800, 3)
    for colour in ("#1f77b4", "#ff7f0e"):  # matplotlib's first two line colours: one per run
        rgb = np.array([int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5)])
        assert (np.abs(pixels - rgb).max(-1) < 0.02).sum() > 200
    records = read_metrics(tmp_path / "halo")
    steps, losses = series(records, "loss", "step")
    assert steps == [s for s in range(1, 31) if s != 7]  # the skipped step has no loss to draw
    assert losses[:2] == [5.0, 5 / math.sqrt(2)]
    assert series(records, "val_loss", "tokens") == ([SAMPLES * SEQ * s for s in (5, 10, 15, 20, 25, 30)],
                                                     [5.5 / math.sqrt(s) for s in (5, 10, 15, 20, 25, 30)])
    assert series(records, "tokens_per_s", "step")[1][0] == pytest.approx(SAMPLES * SEQ / 0.51)


def test_a_resumed_run_is_plotted_once_per_step(tmp_path):
    """A run killed after step 5 (its last line torn) resumes from its step-3 checkpoint: the trainer drops
    the lines after step 3, then logs steps 4 to 6 again, with other values."""
    run = tmp_path / "run"
    state = log_steps(run, range(1, 6), 1.0)
    with open(run / METRICS_FILE, "a") as f:
        f.write('{"step": 6, "lo')
    truncate_metrics(run, 3)
    log_steps(run, range(4, 7), 2.0, state=state)
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert series(records, "loss", "step") == ([1, 2, 3, 4, 5, 6], [5 / math.sqrt(s) for s in (1, 2, 3)]
                                               + [10 / math.sqrt(s) for s in (4, 5, 6)])
    assert series(records, "val_loss", "step") == ([5], [11 / math.sqrt(5)])


def test_missing_metrics_file_and_corrupt_line_are_clear_errors(tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"nothing/metrics.jsonl not found"):
        main([str(tmp_path / "nothing"), "-o", str(tmp_path / "o")])
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2}\nnot json\n{"step": 2, "loss": 1}\n')
    with pytest.raises(SystemExit, match=r"metrics.jsonl:2: not a JSON line"):
        main([str(run), "-o", str(tmp_path / "o")])
