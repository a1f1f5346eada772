"""halo-plot: valid PNGs of the expected size, every run on one figure, resumed steps counted once."""

import json
import math
import struct
import zlib

import numpy as np
import pytest

from halo_pretrain.plot import main, read_metrics, series


def write_run(directory, steps, loss_scale, val_every=5):
    directory.mkdir(parents=True)
    lines = []
    for step in range(1, steps + 1):
        lines.append({"step": step, "loss": loss_scale * 5 / math.sqrt(step), "lr": 1e-3 * min(1, step / 5),
                      "consumed_samples": 8 * step, "tokens": 8 * 64 * step, "tokens_per_s": 1000 + step})
        if step % val_every == 0:
            lines.append({"step": step, "val_loss": loss_scale * 5.5 / math.sqrt(step)})
    (directory / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")


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

    write_run(tmp_path / "halo", 30, 1.0)
    write_run(tmp_path / "dense", 30, 1.2)
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


def test_a_step_logged_twice_after_a_resume_keeps_its_last_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = [{"step": s, "loss": 10.0 - s, "tokens": 100 * s, "lr": 0.1} for s in (1, 2, 3, 4)]
    lines += [{"step": s, "loss": 20.0 - s, "tokens": 100 * s, "lr": 0.1} for s in (3, 4, 5)]  # resumed from 2
    lines.append({"step": 4, "val_loss": 7.5})
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n{\"step\": 6, \"lo")
    records = read_metrics(run)
    assert series(records, "loss", "step") == ([1, 2, 3, 4, 5], [9.0, 8.0, 17.0, 16.0, 15.0])
    assert series(records, "val_loss", "tokens") == ([400], [7.5])


def test_missing_metrics_file_and_corrupt_line_are_clear_errors(tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"nothing/metrics.jsonl not found"):
        main([str(tmp_path / "nothing"), "-o", str(tmp_path / "o")])
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2}\nnot json\n{"step": 2, "loss": 1}\n')
    with pytest.raises(SystemExit, match=r"metrics.jsonl:2: not a JSON line"):
        main([str(run), "-o", str(tmp_path / "o")])
