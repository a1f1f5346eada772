"""One trainer per run directory: the lock, its heartbeat, and when a left-over lock counts as stale."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict, replace

import pytest

from halo_pretrain.train.run_config import ConfigError
from halo_pretrain.train.run_lock import LOCK_NAME, Holder, RunLock, RunLockError, stale_reason, this_process


def write_lock(run_dir, holder: Holder, age: float = 0.0):
    path = run_dir / LOCK_NAME
    path.write_text(json.dumps(asdict(holder)))
    then = time.time() - age
    os.utime(path, (then, then))
    return path


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_lock_names_its_holder_and_refuses_a_second_trainer(tmp_path):
    first = RunLock(tmp_path, env={"SLURM_JOB_ID": "4242"})
    assert first.acquire() is None
    held = json.loads((tmp_path / LOCK_NAME).read_text())
    assert (held["host"], held["pid"], held["job"], held["restart"]) == (socket.gethostname(), os.getpid(), "4242", 0)
    second = RunLock(tmp_path, env={"SLURM_JOB_ID": "4243"})
    with pytest.raises(RunLockError, match=rf"in use by another halo-train \(pid {os.getpid()} on "
                                           rf"{socket.gethostname()}, Slurm job 4242 \(restart 0\)") as e:
        second.acquire()
    assert isinstance(e.value, ConfigError)  # exit 2
    assert json.loads((tmp_path / LOCK_NAME).read_text()) == held  # the first trainer's lock is untouched
    first.release()
    assert not (tmp_path / LOCK_NAME).exists()
    assert second.acquire() is None
    second.release()


def test_the_heartbeat_refreshes_the_lock_and_release_keeps_a_lock_that_is_not_ours(tmp_path):
    lock = RunLock(tmp_path, env={}, heartbeat_s=0.05)
    lock.acquire()
    path = tmp_path / LOCK_NAME
    os.utime(path, (time.time() - 500, time.time() - 500))
    time.sleep(0.3)
    assert time.time() - path.stat().st_mtime < 5
    other = replace(this_process({}), host="node-b", pid=1)
    write_lock(tmp_path, other)  # taken over meanwhile (it counted as stale)
    lock.release()
    assert json.loads(path.read_text())["host"] == "node-b"


def test_a_killed_trainers_lock_on_this_host_is_taken_over(tmp_path):
    write_lock(tmp_path, replace(this_process({}), pid=dead_pid()))
    note = RunLock(tmp_path, env={}).acquire()
    assert note is not None and "is gone" in note
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_a_lock_of_another_node_is_stale_only_once_its_heartbeat_stopped(tmp_path):
    other = replace(this_process({}), host="node-b", pid=os.getpid())  # that pid means nothing here
    write_lock(tmp_path, other, age=5)
    with pytest.raises(RunLockError, match="pid .* on node-b"):
        RunLock(tmp_path, env={}, stale_after=60).acquire()
    write_lock(tmp_path, other, age=120)
    note = RunLock(tmp_path, env={}, stale_after=60).acquire()
    assert "heartbeat stopped 120 s ago" in note


def test_a_requeued_slurm_job_takes_over_the_lock_of_its_earlier_run_on_any_node(tmp_path):
    earlier = replace(this_process({"SLURM_JOB_ID": "77"}), host="node-b", pid=os.getpid())
    write_lock(tmp_path, earlier)  # a fresh heartbeat: the node died a moment ago
    with pytest.raises(RunLockError):  # the same restart of the same job: another task of it, alive
        RunLock(tmp_path, env={"SLURM_JOB_ID": "77"}).acquire()
    note = RunLock(tmp_path, env={"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "1"}).acquire()
    assert "earlier run of this Slurm job 77 (restart 0; this is restart 1)" in note


def test_stale_rules():
    me = this_process({"SLURM_JOB_ID": "10"})
    alive, dead = (lambda pid: True), (lambda pid: False)
    unknown_job = lambda job: None  # noqa: E731  (no squeue)
    same_host = replace(me, pid=123)
    assert stale_reason(same_host, 1, me, alive=alive, job_running=unknown_job) is None
    assert "process 123" in stale_reason(same_host, 1, me, alive=dead, job_running=unknown_job)
    # same host name in another pid namespace (a container): its pid cannot be checked from here
    assert stale_reason(replace(same_host, pid_namespace="pid:[1]"), 1, me, alive=dead,
                        job_running=unknown_job) is None
    other_job = replace(me, host="node-c", job="11")
    assert stale_reason(other_job, 1, me, alive=alive, job_running=lambda job: True) is None
    assert "Slurm job 11 is no longer running" in stale_reason(other_job, 1, me, alive=alive,
                                                              job_running=lambda job: False)
    assert stale_reason(other_job, 1, me, alive=alive, job_running=unknown_job) is None
    assert "heartbeat" in stale_reason(other_job, 1000, me, alive=alive, job_running=unknown_job)
