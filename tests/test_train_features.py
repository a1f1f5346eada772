"""halo-train's stop signals, non-finite losses, activation checkpointing, bf16/ZeRO-1, and bad input:
real halo-train processes on CPU."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import yaml

from halo_pretrain.fileio import sha256_file
from halo_pretrain.train.checkpoint import load_model_state
from halo_pretrain.train.metrics import read_metrics
from train_utils import (REPO, losses, make_prepared_dir, record_checksums, run_train, stdlib_sources, tiny_config,
                         train_command, train_env, write_config)

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
    """The uninterrupted 1-process ZeRO-0 run the others are compared with; wandb on, offline because
    WANDB_MODE=offline is in the environment (train_env) and logging.wandb_mode is left unset."""
    config = make_config(workdir, corpus, "plain", logging={"wandb_project": "halo-tests", "progress_bar": True})
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
    assert "wandb could not log online" not in proc.stdout + proc.stderr  # offline from the start: WANDB_MODE
    assert len(losses(run_dir)) == STEPS


def test_sigterm_saves_exits_75_and_resumes_exactly(workdir, corpus, plain):
    """SIGTERM: finish the step, save, exit 75. The rerun resumes with activation checkpointing on every
    block, which must change nothing either (recomputation in fp32 is exact)."""
    config = make_config(workdir, corpus, "sigterm")
    run_dir = workdir / "sigterm"
    code, out, err = signal_after_steps(config, run_dir, signal.SIGTERM)
    assert code == 75, err[-3000:]
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


def test_ctrl_c_saves_and_exits_75_like_sigterm(workdir, corpus):
    config = make_config(workdir, corpus, "sigint", train={"steps": 1000}, checkpoint={"interval": 1000})
    run_dir = workdir / "sigint"
    code, out, err = signal_after_steps(config, run_dir, signal.SIGINT)
    assert code == 75, err[-3000:]
    assert "press Ctrl-C again to stop at once without saving" in err and "KeyboardInterrupt" not in err
    step = len(read_metrics(run_dir))
    assert f"stop requested (SIGINT): checkpoint of step {step} saved" in out
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{step:08d}"
    assert not (run_dir / "halo-train.lock").exists()


def test_a_second_trainer_on_a_run_dir_is_refused_and_a_killed_trainers_lock_does_not_block_the_restart(
        workdir, corpus):
    config = make_config(workdir, corpus, "locked", train={"steps": 100000}, checkpoint={"interval": 5, "keep_last": 2})
    run_dir = workdir / "locked"
    first = subprocess.Popen(train_command(config, 1), env=train_env(), cwd=REPO, text=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_steps(run_dir, 2, first)
        lock = json.loads((run_dir / "halo-train.lock").read_text())
        assert lock["pid"] == first.pid
        second = run_train(config, check=False)
        assert second.returncode == 2
        assert f"is in use by another halo-train (pid {first.pid} on {lock['host']}" in second.stderr
        assert "one trainer per run.dir" in second.stderr
        steps_then = len(read_metrics(run_dir))
        wait_for_steps(run_dir, steps_then + 10, first)  # the first trains on
        assert first.poll() is None
        assert [m["step"] for m in read_metrics(run_dir)] == list(range(1, len(read_metrics(run_dir)) + 1))
    finally:
        first.kill()  # SIGKILL: its lock stays behind
        first.wait()
    assert json.loads((run_dir / "halo-train.lock").read_text())["pid"] == first.pid
    latest = int((run_dir / "checkpoints" / "latest").read_text().strip()[5:])
    proc = run_train(config, overrides=[f"train.steps={latest + 2}"])
    assert f"took over the lock of pid {first.pid} on {lock['host']}" in proc.stdout and "is gone" in proc.stdout
    assert f"resumed from step {latest}" in proc.stdout and f"training done: step {latest + 2}" in proc.stdout
    assert not (run_dir / "halo-train.lock").exists()


def signal_after_steps(config: Path, run_dir: Path, sig: int, steps: int = 2) -> tuple[int, str, str]:
    """Start halo-train, send it `sig` once it logged `steps` steps: (exit code, stdout, stderr)."""
    proc = subprocess.Popen(train_command(config, 1), env=train_env(), cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_steps(run_dir, steps, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def wait_for_steps(run_dir: Path, n: int, proc, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if len(read_metrics(run_dir)) >= n:
            return
        assert proc.poll() is None, f"halo-train ended early with {proc.returncode}"
        time.sleep(0.05)
    raise AssertionError("no progress")


def test_nonfinite_loss_and_gradient_skip_the_update_then_stop_and_the_run_resumes_with_a_lower_lr(workdir, corpus):
    config = make_config(workdir, corpus, "nan", train={"max_nonfinite_steps": 1}, logging={"progress_bar": True},
                         checkpoint={"interval": 1, "keep_last": 5},
                         debug={"inject_nonfinite_steps": [3], "inject_nonfinite_grad_steps": [5]})
    proc = run_train(config, check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "step 3: non-finite loss, update skipped" in out and "step 5: non-finite gradient, update skipped" in out
    newest = workdir / "nan" / "checkpoints" / "step_00000004"
    assert (f"stopping: 2 steps had a non-finite loss or gradient (limit train.max_nonfinite_steps=1); the newest "
            f"checkpoint, {newest}, has finite weights: rerun with a lower optim.lr (now 0.003) to resume from "
            "it") in out
    metrics = read_metrics(workdir / "nan")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5]
    assert [m.get("nonfinite") for m in metrics] == [None, None, "loss", None, "gradient"]
    assert metrics[2]["loss"] is None and metrics[2]["skipped"] and metrics[4]["skipped"]
    assert metrics[4]["loss"] is None and metrics[4]["grad_norm"] is None  # the gradient was the problem
    assert all(metrics[i]["loss"] > 0 for i in (0, 1, 3))
    # the skipped step changed nothing: the weights after step 3 are those after step 2, step 4's are new
    _, after2 = load_model_state(workdir / "nan", step=2)
    _, after3 = load_model_state(workdir / "nan", step=3)
    _, after4 = load_model_state(workdir / "nan", step=4)
    assert all(torch.equal(after2[k], after3[k]) for k in after2)
    assert not torch.equal(after3["embed.weight"], after4["embed.weight"])
    assert not (newest.parent / "step_00000005").exists()  # nothing saved after the stop
    proc = run_train(config, overrides=["debug.inject_nonfinite_steps=[]", "debug.inject_nonfinite_grad_steps=[]",
                                        "optim.lr=1e-3"])
    assert "resumed from step 4" in proc.stdout and "training done: step 10" in proc.stdout
    metrics = read_metrics(workdir / "nan")
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert all(math.isfinite(m["loss"]) for m in metrics[4:])


@pytest.mark.parametrize("zero,precision,nproc", [(1, "bf16", 1), (3, "bf16", 1), (2, "fp32", 2)])
def test_a_nonfinite_gradient_with_a_finite_loss_is_skipped_at_every_zero_stage(workdir, corpus, zero, precision,
                                                                               nproc):
    """The gradient is poisoned on the last rank only: every rank skips the update together."""
    name = f"nangrad_z{zero}_{precision}_{nproc}"
    config = make_config(workdir, corpus, name, train={"steps": 3, "precision": precision},
                         deepspeed={"zero_stage": zero}, checkpoint={"interval": 1, "keep_last": 3},
                         debug={"inject_nonfinite_grad_steps": [2]})
    proc = run_train(config, nproc)
    assert "step 2: non-finite gradient, update skipped (1 so far, limit 10)" in proc.stdout + proc.stderr
    metrics = read_metrics(workdir / name)
    assert [m.get("nonfinite") for m in metrics] == [None, "gradient", None]
    assert math.isfinite(metrics[1]["tokens_per_s"]) and all(math.isfinite(metrics[i]["loss"]) for i in (0, 2))
    states = [load_model_state(workdir / name, step=s)[1] for s in (1, 2, 3)]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])  # step 2 changed nothing
    assert all(torch.isfinite(v).all() for v in states[2].values())
    assert not torch.equal(states[1]["embed.weight"], states[2]["embed.weight"])  # step 3 trained


def test_weights_that_become_nonfinite_are_never_saved(workdir, corpus):
    """An absurd weight decay: the first update overflows float32 although its loss and gradients were finite."""
    config = make_config(workdir, corpus, "overflow", optim={"weight_decay": 1e42, "warmup_steps": 0},
                         checkpoint={"interval": 1})
    proc = run_train(config, check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert ("stopping: the weights after step 1 are not finite (NaN or inf): checkpoint step_00000001 not written; "
            "no checkpoint was written: lower optim.lr (now 0.003) and start again") in proc.stdout
    assert not list((workdir / "overflow" / "checkpoints").glob("step_*"))
    assert math.isfinite(read_metrics(workdir / "overflow")[0]["loss"])


@pytest.mark.parametrize("precision,zero,offload", [("bf16", 1, False), ("fp16", 3, True)])
def test_mixed_precision_and_offload_train_and_export(workdir, corpus, precision, zero, offload):
    """bf16 with ZeRO-1 and activation checkpointing every 2nd block; fp16 (dynamic loss scale) with
    ZeRO-3 and CPU offload of parameters and optimizer."""
    from deepspeed.accelerator import get_accelerator

    if precision == "fp16" and not get_accelerator().is_fp16_supported():
        pytest.skip("DeepSpeed refuses fp16 on this CPU (its CPU accelerator reports no fp16 support)")
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


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def plant_code(tag: Path, marker: Path, name: str = "mp_rank_00_model_states.pt") -> None:
    """Replace a checkpoint file by a pickle that runs code, with its size and sha256 rewritten in
    complete.json, as whoever can write the file can do."""
    torch.save({"module": Payload(marker)}, tag / name)
    complete = json.loads((tag / "complete.json").read_text())
    complete["files"][name] = (tag / name).stat().st_size
    complete["sha256"][name] = sha256_file(tag / name)
    (tag / "complete.json").write_text(json.dumps(complete))


def test_a_checkpoint_that_would_run_code_is_refused_and_the_previous_one_resumed(workdir, plain, tmp_path):
    config, run_dir = copy_run(workdir, plain[0], "planted")
    marker = tmp_path / "code-ran"
    plant_code(run_dir / "checkpoints" / "step_00000010", marker)
    proc = run_train(config)
    assert not marker.exists()
    assert ("step_00000010 is unusable: mp_rank_00_model_states.pt holds more than tensors and plain data: refused "
            "unread, nothing in it ran (Trying to load unsupported GLOBAL posix.mkdir") in proc.stdout
    assert "resumed from step 8" in proc.stdout
    assert losses(run_dir) == losses(plain[0])
    # the only checkpoint: exit 4, naming the file
    config, run_dir = copy_run(workdir, plain[0], "planted_only")
    for old in ("step_00000004", "step_00000008"):
        shutil.rmtree(run_dir / "checkpoints" / old)
    plant_code(run_dir / "checkpoints" / "step_00000010", marker)
    proc = run_train(config, check=False)
    assert proc.returncode == 4 and not marker.exists()
    assert re.search(r"error: no usable checkpoint in .*planted_only/checkpoints \(step_00000010: "
                     r"mp_rank_00_model_states.pt holds more than tensors and plain data", proc.stderr)


def test_checkpoint_of_another_model_shape_is_refused(workdir, plain):
    config, run_dir = copy_run(workdir, plain[0], "reshaped")
    proc = run_train(config, overrides=["model.hidden_size=32"], check=False)
    assert proc.returncode == 4
    assert "different shape (hidden_size: checkpoint 64, this run 32)" in proc.stderr
    assert (run_dir / "checkpoints" / "step_00000010" / "complete.json").is_file()  # nothing touched


def test_disk_full_at_save_keeps_the_previous_checkpoint(workdir, corpus, plain, tmp_path):
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
        shutil.copytree(mount / "ckpt", tmp_path / "ckpt")  # the kept checkpoint, moved to a disk with room
    finally:
        subprocess.run(["umount", str(mount)])
    proc = run_train(config, overrides=[f"checkpoint.dir={tmp_path / 'ckpt'}"])
    assert "resumed from step 2" in proc.stdout
    assert losses(workdir / "diskfull") == losses(plain[0])  # it held step 2's whole state: the run goes on exactly


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


def test_a_corrupted_shard_stops_the_run_naming_it(workdir, tmp_path):
    docs = stdlib_sources(60_000, skip=80)
    data = record_checksums(make_prepared_dir(tmp_path / "data", docs[:-2], docs[-2:]))
    shard = data / "train_00000.bin"
    tokens = np.fromfile(shard, dtype=np.uint16)
    (tokens | 0x8000).astype(np.uint16).tofile(shard)  # a bit flipped in every token: all outside the vocabulary
    config = make_config(workdir, data, "corrupt")
    proc = run_train(config, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"error: data: {shard}: checksum sha256:" in proc.stderr and "differs from the manifest's" in proc.stderr
    assert not (workdir / "corrupt" / "checkpoints").exists() and not (workdir / "corrupt" / "config.yaml").exists()
    # without the checksums, the first sample read names the shard and the position of its first bad token
    proc = run_train(config, overrides=["data.verify_checksums=false"], check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    found = re.search(rf"halo-train: rank 0: error: data: {shard}: token (\d+) at position (\d+) is outside the "
                      r"vocabulary 0..256 of .*manifest.json: the shard is corrupted", proc.stderr)
    assert found, proc.stderr[-3000:]
    token, position = map(int, found.groups())
    assert np.fromfile(shard, dtype=np.uint16)[position] == token >= 0x8000
    assert "Traceback" not in proc.stderr


def test_a_save_that_fails_on_one_rank_fails_on_all_without_a_hang(workdir, corpus):
    config = make_config(workdir, corpus, "failsave", deepspeed={"zero_stage": 2},
                         checkpoint={"interval": 2, "keep_last": 3}, debug={"fail_save": [4, 1]})
    proc = run_train(config, 2, check=False, timeout=240)
    assert proc.returncode == 4, proc.stderr[-3000:]
    for rank in (0, 1):
        assert re.search(rf"halo-train: rank {rank}: error: saving checkpoint .*step_00000004 failed \(.* were free "
                         r"there\) on rank 1: OSError: \[Errno 28\] No space left on device \(debug.fail_save\)\. "
                         r"The previous complete checkpoint \(step_00000002\) is intact", proc.stderr), rank
    ckpt = workdir / "failsave" / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_00000002"
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_00000002"]
