"""One trainer per run directory: `<run.dir>/halo-train.lock`.

The lock file is created exclusively (O_CREAT | O_EXCL, atomic on local disks, NFS v3+, Lustre and
GPFS) by rank 0 and names its holder: host, pid, pid namespace, Slurm job id and restart count. While
the trainer lives, a thread refreshes the file's modification time every HEARTBEAT_S seconds. A
second trainer that finds the file refuses to start (exit 2) unless the lock is stale:

- it was left by an earlier run of the same Slurm job (same SLURM_JOB_ID, lower SLURM_RESTART_COUNT:
  a requeue, on whatever node: Slurm ends every task of a job before it requeues it);
- its holder ran on this host (same pid namespace) and that pid is gone (killed, crashed);
- its Slurm job, another one, is no longer running (squeue says so, where there is one);
- or its heartbeat stopped STALE_AFTER_S seconds ago: a holder on another node that died with no
  Slurm job to ask about. The age is measured against a file this trainer touches in the same
  directory, so clocks of different nodes need not agree (a shared filesystem stamps both).

The lock is removed when the trainer ends, whatever the exit code; only SIGKILL or a crashed node
leaves it, and the rules above take it over.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping

from .run_config import ConfigError

LOCK_NAME = "halo-train.lock"
HEARTBEAT_S = 10.0
STALE_AFTER_S = 90.0


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    pid_namespace: str
    job: str | None  # SLURM_JOB_ID
    restart: int  # SLURM_RESTART_COUNT
    started: float

    def describe(self) -> str:
        job = f", Slurm job {self.job} (restart {self.restart})" if self.job else ""
        return f"pid {self.pid} on {self.host}{job}"


def this_process(env: Mapping[str, str] = os.environ) -> Holder:
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return Holder(host=socket.gethostname(), pid=os.getpid(), pid_namespace=namespace,
                  job=env.get("SLURM_JOB_ID") or None, restart=int(env.get("SLURM_RESTART_COUNT") or 0),
                  started=time.time())


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def slurm_job_running(job: str) -> bool | None:
    """True/False from squeue; None when Slurm cannot be asked, or no longer knows the job (squeue
    fails on a job id it has purged: the heartbeat rule then decides)."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return any(state in ("RUNNING", "COMPLETING", "SUSPENDED", "STOPPED") for state in out.stdout.split())


def stale_reason(holder: Holder, heartbeat_age: float, me: Holder, stale_after: float = STALE_AFTER_S,
                 alive=pid_alive, job_running=slurm_job_running) -> str | None:
    """Why the lock `holder` wrote is stale, or None when its trainer may still run."""
    if holder.job is not None and holder.job == me.job and holder.restart < me.restart:
        return (f"it was left by an earlier run of this Slurm job {me.job} (restart {holder.restart}; this is "
                f"restart {me.restart})")
    if holder.host == me.host and holder.pid_namespace == me.pid_namespace and not alive(holder.pid):
        return f"process {holder.pid} on {holder.host} is gone"
    if holder.job is not None and holder.job != me.job and job_running(holder.job) is False:
        return f"Slurm job {holder.job} is no longer running"
    if heartbeat_age > stale_after:
        return f"its heartbeat stopped {heartbeat_age:.0f} s ago"
    return None


class RunLockError(ConfigError):
    """run.dir is in use by another trainer (exit 2); the message names it and what to do."""


class RunLock:
    def __init__(self, run_dir: Path, env: Mapping[str, str] = os.environ, heartbeat_s: float = HEARTBEAT_S,
                 stale_after: float = STALE_AFTER_S):
        self.path = Path(run_dir) / LOCK_NAME
        self.me = this_process(env)
        self.heartbeat_s, self.stale_after = heartbeat_s, stale_after
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(self.me), f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _read(self) -> tuple[Holder | None, float]:
        """(the holder, or None when the file is unreadable, and the age of its heartbeat in seconds)."""
        probe = self.path.with_name(f".{LOCK_NAME}.clock.{self.me.host}.{self.me.pid}")
        probe.touch()
        try:
            now = probe.stat().st_mtime  # the filesystem's clock, the one that stamps the heartbeat
        finally:
            probe.unlink(missing_ok=True)
        try:
            age = now - self.path.stat().st_mtime
            holder = Holder(**json.loads(self.path.read_text()))
        except FileNotFoundError:
            return None, -1.0
        except (OSError, ValueError, TypeError):
            return None, age
        return holder, age

    def acquire(self) -> str | None:
        """Take the lock; a stale one is taken over (returns what to say about it). RunLockError when
        another trainer holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        taken_over = None
        for _ in range(5):
            if self._create():
                self._start_heartbeat()
                return taken_over
            holder, age = self._read()
            if holder is None and age < 0:
                continue  # removed meanwhile: try again
            if holder is None:
                if age <= self.stale_after:  # being written right now, or damaged: wait a little
                    time.sleep(0.2)
                    continue
                reason, who = f"it is unreadable and {age:.0f} s old", "an unknown trainer"
            else:
                reason, who = stale_reason(holder, age, self.me, self.stale_after), holder.describe()
            if reason is None:
                raise RunLockError(
                    f"{self.path.parent} is in use by another halo-train ({who}, heartbeat {age:.0f} s ago): one "
                    f"trainer per run.dir. Wait for it or stop it, or use another run.dir. If it is dead, its lock "
                    f"{self.path} counts as stale {self.stale_after:.0f} s after its last heartbeat (or delete it).")
            if self._still(holder):
                self.path.unlink(missing_ok=True)
                taken_over = f"took over the lock of {who} in {self.path}: {reason}"
        raise RunLockError(f"could not take the lock {self.path} (it keeps changing: another trainer is starting "
                           "in this run.dir)")

    def _still(self, holder: Holder | None) -> bool:
        """The lock file still names `holder` (not a newer trainer that took it meanwhile)."""
        now, _ = self._read()
        return now == holder

    def _start_heartbeat(self) -> None:
        def beat():
            while not self._stop.wait(self.heartbeat_s):
                try:
                    os.utime(self.path)
                except OSError:
                    pass  # a filesystem hiccup: the next beat tries again

        self._thread = threading.Thread(target=beat, name="halo-train-lock-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=5)
        self._thread = None
        holder, _ = self._read()
        if holder == self.me:
            self.path.unlink(missing_ok=True)
