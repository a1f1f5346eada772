"""slurm/train.sbatch and slurm/prep.sbatch, submitted with sbatch to a real Slurm cluster on this machine."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_cluster import (COMPARED, STEPS, SlurmCluster, compared, reference_run, run_config,  # noqa: F401
                           slurm_cluster, train_data)
from train_utils import REPO, stdlib_sources, train_env

pytestmark = pytest.mark.slow

TRAIN = REPO / "slurm" / "train.sbatch"
PREP = REPO / "slurm" / "prep.sh"
CPU_JOB = ["--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1"]


def job_env(**extra) -> dict:
    """No PYTHONPATH: train.sbatch finds the checkout it was submitted from by itself."""
    env = {**train_env(), "HALO_SLURM_CPU": "1", **extra}
    env.pop("PYTHONPATH")
    return env


def submit(cluster: SlurmCluster, config: Path, tmp: Path, options=(), **env) -> str:
    return cluster.sbatch(TRAIN, "--config", config,
                          options=[*CPU_JOB, f"--output={tmp}/job-%j.out", *options], env=job_env(**env), cwd=tmp)


def job_log(tmp: Path, job_id: str) -> str:
    return (tmp / f"job-{job_id}.out").read_text()


def metrics(run_dir: Path) -> list[dict]:
    from halo_pretrain.train.metrics import read_metrics

    return read_metrics(run_dir)


def wait_for_steps(cluster: SlurmCluster, job_id: str, run_dir: Path, steps: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if len(metrics(run_dir)) >= steps:
            return
        state = cluster.job(job_id)["JobState"]
        if state not in ("PENDING", "RUNNING", "CONFIGURING"):
            raise AssertionError(f"job {job_id} is {state} before step {steps}")
        time.sleep(0.05)
    raise TimeoutError(f"job {job_id} did not reach step {steps}")


def preempt(cluster: SlurmCluster, job_id: str) -> None:
    """What Slurm does before the time limit with --signal=B:USR1@<seconds>."""
    cluster.run(["scancel", "--signal=USR1", "--batch", job_id])


def wait_requeued(cluster: SlurmCluster, job_id: str, restarts: int) -> dict:
    return cluster.wait(job_id, timeout=120, until=lambda j: int(j["Restarts"]) >= restarts)


def checkpoint_files(ckpt: Path) -> dict[str, bytes]:
    return {str(p.relative_to(ckpt)): p.read_bytes() for p in sorted(ckpt.rglob("*")) if p.is_file()}


# ---- train.sbatch -------------------------------------------------------------------------------------


def test_train_job_completes_with_the_metrics_of_a_direct_run(slurm_cluster, train_data, reference_run, tmp_path):
    config = run_config(tmp_path, "run", train_data)
    job = submit(slurm_cluster, config, tmp_path)
    info = slurm_cluster.wait(job)
    log = job_log(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    assert "1 node(s) x 1 = 1 ranks" in log and "training finished" in log
    assert compared(metrics(tmp_path / "run")) == compared(reference_run)
    assert (tmp_path / "run" / "logs" / f"slurm-{job}" / "restart-0" / "rank-0.log").read_text().count(
        "starting a new run") == 1
    assert "[rank 0] [halo-train]" in log  # rank 0's progress is mirrored into the job log


def test_preempted_job_saves_requeues_and_resumes_to_the_same_losses(slurm_cluster, train_data, reference_run,
                                                                      tmp_path):
    config = run_config(tmp_path, "run", train_data)
    run_dir = tmp_path / "run"
    job = submit(slurm_cluster, config, tmp_path)
    wait_for_steps(slurm_cluster, job, run_dir, 8)
    preempt(slurm_cluster, job)
    wait_requeued(slurm_cluster, job, 1)
    stopped_at = len(metrics(run_dir))
    assert 8 <= stopped_at < STEPS
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{stopped_at:08d}"
    info = slurm_cluster.wait(job)
    log = job_log(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    assert "got SIGUSR1" in log and "requeueing (restart 1 of at most 20)" in log and "training finished" in log
    stopped = (run_dir / "logs" / f"slurm-{job}" / "restart-0" / "rank-0.log").read_text()
    assert f"stop requested (SIGUSR1): checkpoint of step {stopped_at} saved" in stopped
    resumed = (run_dir / "logs" / f"slurm-{job}" / "restart-1" / "rank-0.log").read_text()
    assert f"resumed from step {stopped_at}" in resumed
    assert compared(metrics(run_dir)) == compared(reference_run)


def test_job_without_its_checkpoints_or_past_its_requeue_bound_stops_and_keeps_them(
        slurm_cluster, train_data, reference_run, tmp_path):
    config = run_config(tmp_path, "run", train_data)
    run_dir, ckpt = tmp_path / "run", tmp_path / "run" / "checkpoints"
    job = submit(slurm_cluster, config, tmp_path, HALO_MAX_REQUEUES="2")
    wait_for_steps(slurm_cluster, job, run_dir, 5)
    preempt(slurm_cluster, job)
    wait_requeued(slurm_cluster, job, 1)

    # The requeued job lands on a node that does not mount the checkpoint directory.
    slurm_cluster.run(["scontrol", "hold", job])
    elsewhere = tmp_path / "other-filesystem"
    shutil.move(ckpt, elsewhere)
    saved, metrics_before = checkpoint_files(elsewhere), (run_dir / "metrics.jsonl").read_text()
    slurm_cluster.run(["scontrol", "release", job])
    info = slurm_cluster.wait(job)
    log = job_log(tmp_path, job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "4:0", log
    assert f"{ckpt}/latest is missing on" in log and "Not starting" in log and "shared filesystem" in log
    assert not ckpt.exists() and checkpoint_files(elsewhere) == saved
    assert (run_dir / "metrics.jsonl").read_text() == metrics_before

    # The mount is fixed; requeue as the message says. Preempted again, the job is past its bound.
    shutil.move(elsewhere, ckpt)
    slurm_cluster.run(["scontrol", "requeue", job])
    wait_requeued(slurm_cluster, job, 2)
    wait_for_steps(slurm_cluster, job, run_dir, len(metrics_before.splitlines()) + 5)
    preempt(slurm_cluster, job)
    info = slurm_cluster.wait(job)
    log = job_log(tmp_path, job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "75:0" and info["Restarts"] == "2", log
    assert "not requeued: the job was already requeued 2 times (HALO_MAX_REQUEUES=2)" in log
    stopped_at = len(metrics(run_dir))
    assert stopped_at < STEPS
    assert (ckpt / "latest").read_text().strip() == f"step_{stopped_at:08d}"
    assert (ckpt / f"step_{stopped_at:08d}" / "complete.json").is_file()

    again = submit(slurm_cluster, config, tmp_path)  # what the message says to do
    assert slurm_cluster.wait(again)["JobState"] == "COMPLETED", job_log(tmp_path, again)
    assert f"resumed from step {stopped_at}" in job_log(tmp_path, again)
    assert compared(metrics(run_dir)) == compared(reference_run)


def test_busy_master_port_is_named_in_the_job_log(slurm_cluster, train_data, tmp_path):
    config = run_config(tmp_path, "run", train_data)
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        job = submit(slurm_cluster, config, tmp_path, MASTER_PORT=str(port))
        info = slurm_cluster.wait(job)
    log = job_log(tmp_path, job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", log
    assert f"MASTER_PORT={port} is already in use on n1" in log and "unset MASTER_PORT" in log
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_no_free_port_in_the_job_range_is_named_in_the_job_log(slurm_cluster, train_data, tmp_path):
    config = run_config(tmp_path, "run", train_data)
    job = submit(slurm_cluster, config, tmp_path, options=["--hold"])
    first = 20000 + int(job) % 20000  # the script's range: 100 ports from here
    with contextlib.ExitStack() as stack:
        for port in range(first, first + 100):
            busy = stack.enter_context(socket.socket())
            busy.bind(("", port))
            busy.listen()
        slurm_cluster.run(["scontrol", "release", job])
        info = slurm_cluster.wait(job)
    log = job_log(tmp_path, job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", log
    assert f"no free port in {first}-{first + 99} on n1" in log and "export MASTER_PORT=" in log
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_job_requeued_beyond_its_bound_does_not_start(slurm_cluster, train_data, tmp_path):
    """Requeued by Slurm itself (as after a node failure) while it reads its config, more often than
    HALO_MAX_REQUEUES allows: the cut-short check is not blamed on the config, and the restart is refused."""
    config = run_config(tmp_path, "run", train_data)
    checking = tmp_path / "config-check-started"
    slow_python = tmp_path / "slow-python"
    slow_python.write_text(f'#!/bin/bash\ntouch {checking}\nsleep 60\nexec python3 "$@"\n')
    slow_python.chmod(0o755)
    job = submit(slurm_cluster, config, tmp_path, HALO_MAX_REQUEUES="0", HALO_PYTHON=str(slow_python))
    deadline = time.time() + 60
    while not checking.exists():
        assert time.time() < deadline, slurm_cluster.job(job)
        time.sleep(0.2)
    slurm_cluster.run(["scontrol", "requeue", job])
    info = slurm_cluster.wait(job, until=lambda j: j["Restarts"] == "1" and j["JobState"] == "FAILED")
    log = job_log(tmp_path, job)
    first, restarted, second = log.partition("restart 1 of at most 0")
    assert restarted, log
    assert "during the checks (the one that failed was cut short); nothing was started" in first, log
    assert "fix the config" not in first, log
    assert info["ExitCode"] == "75:0", log
    assert "this job was requeued 1 times, more than HALO_MAX_REQUEUES=0; not starting" in second
    assert "run.dir" not in second  # nothing was launched


def test_bad_config_is_named_in_the_job_log_before_anything_starts(slurm_cluster, train_data, tmp_path):
    config = run_config(tmp_path, "run", train_data)
    job = slurm_cluster.sbatch(TRAIN, "--config", config, "train.stepz=10", options=[*CPU_JOB, f"--output={tmp_path}/job-%j.out"],
                               env=job_env(), cwd=tmp_path)
    info = slurm_cluster.wait(job)
    log = job_log(tmp_path, job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", log
    assert "unknown key 'train.stepz'; did you mean 'train.steps'?" in log and "rendezvous" not in log


def test_allocation_with_fewer_gpus_than_asked_is_refused(slurm_cluster, train_data, tmp_path):
    """The test nodes give out 2 GPUs each (gres.conf) that torch cannot see: a broken GPU node."""
    config = run_config(tmp_path, "run", train_data)
    env = {**job_env(), "HALO_SLURM_CPU": "0"}
    job = slurm_cluster.sbatch(TRAIN, "--config", config, options=["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=2",
                                                       "--cpus-per-task=1", f"--output={tmp_path}/job-%j.out"],
                               env=env, cwd=tmp_path)
    info = slurm_cluster.wait(job)
    log = job_log(tmp_path, job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", log
    assert "fewer GPUs than asked: 2 per node wanted, but n1 has 0" in log
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# ---- prep.sbatch ----------------------------------------------------------------------------------


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_prep_array_job_writes_byte_for_byte_what_one_process_writes(slurm_cluster, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = stdlib_sources(150_000)
    for i in range(3):
        (corpus / f"part{i}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[i::3]))
    args = ["--tokenizer", "byte", "--docs-per-shard", "2", "--val-fraction", "0.2", "--workers", "1", str(corpus)]
    single = subprocess.run([sys.executable, "-m", "data_prep", "-o", str(tmp_path / "single"), *args],
                            env=train_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr

    out = slurm_cluster.run(["bash", str(PREP), "--cpus-per-task=1", "3", "-o", str(tmp_path / "array"), *args],
                            env=train_env(), cwd=tmp_path).stdout
    array_job, merge_job = re.search(r"array job (\d+) \(3 tasks\), then job (\d+) writes", out).groups()
    tasks = [slurm_cluster.wait(array_job, timeout=120)] + slurm_cluster.jobs(array_job)
    merge = slurm_cluster.wait(merge_job)
    assert merge["JobState"] == "COMPLETED", (tmp_path / f"slurm-halo-prep-{merge_job}.out").read_text()
    assert merge["Dependency"] == "(null)" and all(t["JobState"] == "COMPLETED" for t in tasks)

    task_logs = [(tmp_path / f"slurm-halo-prep-{t['JobId']}.out").read_text() for t in slurm_cluster.jobs(array_job)]
    written = [int(re.search(r"shards written: (\d+)", log).group(1)) for log in task_logs]
    assert len(written) == 3 and all(n > 0 for n in written), task_logs  # each task did its part
    merge_log = (tmp_path / f"slurm-halo-prep-{merge_job}.out").read_text()
    assert re.search(rf"shards written: 0, already complete: {sum(written)}", merge_log), merge_log
    assert (tmp_path / "array" / "manifest.json").is_file()
    assert tree(tmp_path / "array") == tree(tmp_path / "single")
