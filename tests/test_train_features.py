"""halo-train's stop signals, non-finite losses, activation checkpointing, bf16/ZeRO-1, and bad input:
real halo-train processes on CPU."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from halo_pretrain.train.checkpoint import load_model_state
from halo_pretrain.train.metrics import read_metrics
from train_utils import (REPO, losses, make_prepared_dir, run_train, stdlib_sources, tiny_config, train_command,
                         train_env, write_config)

pytestmark = pytest.mark.slow
STEPS = 10


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    docs = stdlib_sources(300_000, skip=40)
    return make_prepared_dir(tmp_path_factory.mktemp("corpus"), docs[:-3], docs[-3:], docs_per_shard=30)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("features")


def make_config(workdir: Path, corpus: Path, name: str, **sections) -> Path:
    cfg = tiny_config(workdir / name, corpus, train={"steps": STEPS}, checkpoint={"interval": 4, "keep_last": 3})
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return write_config(workdir / f"{name}.yaml", cfg)


@pytest.fixture(scope="module")
def plain(workdir, corpus):
    """The uninterrupted 1-process ZeRO-0 run the others are compared with (wandb offline on)."""
    config = make_config(workdir, corpus, "plain", logging={"wandb_project": "halo-tests", "wandb_mode": "offline",
                                                           "progress_bar": True})
    proc = run_train(config)
    return workdir / "plain", proc


def test_plain_run_logs_progress_and_wandb_offline(plain):
    run_dir, proc = plain
    # stdout is a pipe, not a terminal: plain lines (logging.log_interval=10) instead of the progress bar
    assert "train:" not in proc.stdout + proc.stderr and "\r" not in proc.stdout + proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("[halo-train] step 10/10 | loss "))
    assert " tok/s | mfu - | mem " in line and line.endswith(" | eta 0s")
    assert "training done: step 10" in proc.stdout and "[halo-train] summary: ran steps 1-10 of 10 in " in proc.stdout
    assert list((run_dir / "wandb").glob("offline-run-*")), "wandb offline run directory missing"
    assert len(losses(run_dir)) == STEPS


def test_sigterm_saves_exits_75_and_resumes_exactly(workdir, corpus, plain):
    """SIGTERM: finish the step, save, exit 75. The rerun resumes with activation checkpointing on every
    block, which must change nothing either (recomputation in fp32 is exact)."""
    config = make_config(workdir, corpus, "sigterm")
    run_dir = workdir / "sigterm"
    proc = subprocess.Popen(train_command(config, 1), env=train_env(), cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_for_steps(run_dir, 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out[-3000:]
    stopped_at = len(read_metrics(run_dir))
    assert 2 <= stopped_at < STEPS
    assert "stop requested (SIGTERM)" in out
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{stopped_at:08d}"
    run_train(config, overrides=["train.activation_checkpointing=1"])
    assert losses(run_dir) == losses(plain[0])


def test_sigusr1_to_one_rank_stops_all_under_the_deepspeed_launcher(workdir, corpus):
    config = make_config(workdir, corpus, "sigusr1", deepspeed={"zero_stage": 2})
    run_dir = workdir / "sigusr1"
    proc = subprocess.Popen(train_command(config, 2), env=train_env(), cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_steps(run_dir, 2, proc)
        ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
                 if "--local_rank=1" in " ".join(p.cmdline())]
        assert len(ranks) == 1
        ranks[0].send_signal(signal.SIGUSR1)  # rank 1 only: the stop is agreed over all ranks
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 75, out[-3000:]
    step = len(read_metrics(run_dir))
    tag = run_dir / "checkpoints" / f"step_{step:08d}"
    assert (tag / "complete.json").is_file() and step < STEPS
    assert {p.name for p in (tag / "rng").iterdir()} == {"rank_00000.json", "rank_00001.json"}


def wait_for_steps(run_dir: Path, n: int, proc, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if len(read_metrics(run_dir)) >= n:
            return
        assert proc.poll() is None, f"halo-train ended early with {proc.returncode}"
        time.sleep(0.05)
    raise AssertionError("no progress")


def test_nonfinite_loss_skips_the_update_then_stops(workdir, corpus):
    config = make_config(workdir, corpus, "nan", train={"max_nonfinite_steps": 1}, logging={"progress_bar": True},
                         checkpoint={"interval": 1, "keep_last": 5}, debug={"inject_nonfinite_steps": [3, 5]})
    proc = run_train(config, check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "2 steps had a non-finite loss" in proc.stdout + proc.stderr
    metrics = read_metrics(workdir / "nan")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5]
    assert metrics[2]["loss"] is None and metrics[2]["skipped"] and metrics[4]["skipped"]
    assert all(metrics[i]["loss"] > 0 for i in (0, 1, 3))
    # the skipped step changed nothing: the weights after step 3 are those after step 2, step 4's are new
    _, after2 = load_model_state(workdir / "nan", step=2)
    _, after3 = load_model_state(workdir / "nan", step=3)
    _, after4 = load_model_state(workdir / "nan", step=4)
    assert all(torch.equal(after2[k], after3[k]) for k in after2)
    assert not torch.equal(after3["embed.weight"], after4["embed.weight"])
    assert not (workdir / "nan" / "checkpoints" / "step_00000005").exists()  # nothing saved after the stop


@pytest.mark.parametrize("precision,zero,offload", [("bf16", 1, False), ("fp16", 3, True)])
def test_mixed_precision_and_offload_train_and_export(workdir, corpus, precision, zero, offload):
    """bf16 with ZeRO-1 and activation checkpointing every 2nd block; fp16 (dynamic loss scale) with
    ZeRO-3 and CPU offload of parameters and optimizer."""
    name = f"{precision}_z{zero}"
    config = make_config(workdir, corpus, name, train={"precision": precision, "activation_checkpointing": 2},
                         deepspeed={"zero_stage": zero, "offload": offload})
    run_train(config)
    values = losses(workdir / name)
    assert len(values) == STEPS and values[-1] < values[0] - 0.3
    config_, state = load_model_state(workdir / name)
    assert state["embed.weight"].dtype == torch.float32 and config_.num_layers == 2
    assert yaml.safe_load((workdir / name / "config.yaml").read_text())["train"]["precision"] == precision


def copy_run(workdir: Path, source: Path, name: str, *overrides: str) -> tuple[Path, Path]:
    run_dir = workdir / name
    shutil.copytree(source, run_dir)
    cfg = yaml.safe_load((workdir / f"{source.name}.yaml").read_text())
    cfg["run"]["dir"] = str(run_dir)
    cfg.get("logging", {}).pop("wandb_project", None)
    return write_config(workdir / f"{name}.yaml", cfg), run_dir


def test_truncated_and_corrupted_checkpoints_fall_back(workdir, plain):
    config, run_dir = copy_run(workdir, plain[0], "damaged")
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000004", "step_00000008", "step_00000010"]
    newest = ckpts / "step_00000010" / "mp_rank_00_model_states.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated
    middle = ckpts / "step_00000008" / "mp_rank_00_model_states.pt"
    data = bytearray(middle.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = b"\xff" * 64  # same size, flipped bytes
    middle.write_bytes(bytes(data))
    proc = run_train(config)
    assert "step_00000010 is unusable: mp_rank_00_model_states.pt is truncated" in proc.stdout
    assert "step_00000008 is unusable: mp_rank_00_model_states.pt does not match its checksum" in proc.stdout
    assert "resumed from step 4" in proc.stdout
    assert losses(run_dir) == losses(plain[0])  # redone from step 4 to the same end


def test_checkpoint_of_another_model_shape_is_refused(workdir, plain):
    config, run_dir = copy_run(workdir, plain[0], "reshaped")
    proc = run_train(config, overrides=["model.hidden_size=32"], check=False)
    assert proc.returncode == 4
    assert "different shape (hidden_size: checkpoint 64, this run 32)" in proc.stderr
    assert (run_dir / "checkpoints" / "step_00000010" / "complete.json").is_file()  # nothing touched


def test_disk_full_at_save_keeps_the_previous_checkpoint(workdir, corpus, tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2200k", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        config = make_config(workdir, corpus, "diskfull", checkpoint={"interval": 2, "keep_last": 3,
                                                                      "dir": str(mount / "ckpt")})
        proc = run_train(config, check=False)
        assert proc.returncode == 4, proc.stderr[-3000:]
        assert re.search(r"saving checkpoint .*step_00000004 failed \(0\.\d MiB were free there\)", proc.stderr)
        assert "The previous complete checkpoint (step_00000002) is intact" in proc.stderr
        assert (mount / "ckpt" / "latest").read_text().strip() == "step_00000002"
        assert [p.name for p in (mount / "ckpt").glob("step_*")] == ["step_00000002"]  # the partial one removed
        config_, state = load_model_state(workdir / "diskfull")
        assert len(state) > 0
    finally:
        subprocess.run(["umount", str(mount)])


def test_bad_data_directories_are_clear_errors(workdir, corpus, tmp_path):
    empty = tmp_path / "nodata"
    empty.mkdir()
    config = make_config(workdir, corpus, "nomanifest", data={"path": str(empty)})
    proc = run_train(config, check=False)
    assert proc.returncode == 2
    assert f"{empty}/manifest.json" in proc.stderr and "halo-prep" in proc.stderr
    big = make_prepared_dir(tmp_path / "bigvocab", ["hello world " * 50], [], vocab_size=50257)
    proc = run_train(make_config(workdir, corpus, "bigvocab", data={"path": str(big)}), check=False)
    assert proc.returncode == 2
    assert "vocab_size=50257" in proc.stderr and "model's vocab_size=320" in proc.stderr
    assert json.loads((big / "manifest.json").read_text())["vocab_size"] == 50257
