"""A real Slurm cluster on this machine for the tests: munged, slurmctld and two slurmd daemons
(nodes n1 and n2, both 127.0.0.1), configured in a temporary directory and stopped afterwards.

Needs Debian's `slurm-wlm` and `munge` (.ci/run installs them). Tests get it through the
`slurm_cluster` fixture; one cluster serves the whole pytest session.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

NODES = ("n1", "n2")
CPUS_PER_NODE = 4  # more than the machine has: slurmd accepts it with config_overrides
GPUS_PER_NODE = 2  # Slurm hands these out, but the nodes have none: "an allocation with fewer GPUs than asked"
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo")


def missing_binaries() -> list[str]:
    return [b for b in DAEMONS + CLIENTS if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def _bin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_conf(root: Path, user: str, ctld_port: int, node_ports: dict[str, int]) -> str:
    host = socket.gethostname().split(".")[0]
    nodes = "\n".join(f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={p} CPUs={CPUS_PER_NODE} "
                      f"RealMemory=2000 Gres=gpu:{GPUS_PER_NODE} State=UNKNOWN" for n, p in node_ports.items())
    return f"""\
ClusterName=halotest
GresTypes=gpu
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
AuthInfo=socket={root}/munge.socket,cred_expire=5
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
MinJobAge=3600
KillWait=5
InactiveLimit=0
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._pid_files: list[Path] = []

    # ---- lifecycle --------------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> "SlurmCluster":
        root = self.root
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o755)  # munged wants the socket's directory searchable by all
        for d in ("state", *(f"spool/{n}" for n in NODES)):
            (root / d).mkdir(parents=True, exist_ok=True)
        key = root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._daemon([_bin("munged"), "--force", f"--key-file={key}", f"--socket={root}/munge.socket",
                      f"--pid-file={root}/munged.pid", f"--log-file={root}/munged.log",
                      f"--seed-file={root}/munged.seed"], root / "munged.pid")
        node_ports = {n: _free_port() for n in NODES}
        for i in range(GPUS_PER_NODE):  # stand-ins for /dev/nvidia*: Slurm only needs the names
            (root / f"fake-gpu{i}").touch()
        (root / "gres.conf").write_text(f"NodeName={','.join(NODES)} Name=gpu File={root}/fake-gpu[0-{GPUS_PER_NODE - 1}]\n")
        self.conf.write_text(_slurm_conf(root, getpass.getuser(), _free_port(), node_ports))
        self._daemon([_bin("slurmctld"), "-f", str(self.conf)], root / "slurmctld.pid")
        for n in NODES:
            self._daemon([_bin("slurmd"), "-f", str(self.conf), "-N", n], root / f"slurmd.{n}.pid")
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False).stdout.split()
            states = dict(zip(out[::2], out[1::2]))
            if all(states.get(n) == "idle" for n in NODES):
                return self
            time.sleep(0.5)
        raise RuntimeError(f"the test Slurm cluster did not come up in {timeout}s: sinfo says {states}\n"
                           + self.logs())

    def _daemon(self, cmd: list[str], pid_file: Path) -> None:
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr}\n{self.logs()}")
        for _ in range(100):
            if pid_file.exists() and pid_file.read_text().strip():
                break
            time.sleep(0.1)
        self._pid_files.append(pid_file)

    def stop(self) -> None:
        self.run(["scancel", "--full", f"--user={getpass.getuser()}"], check=False)
        deadline = time.time() + 30
        while time.time() < deadline and self.run(["squeue", "-h"], check=False).stdout.strip():
            time.sleep(0.5)
        for pid_file in reversed(self._pid_files):  # slurmd, slurmctld, then munged
            try:
                pid = int(pid_file.read_text().split()[0])
                os.kill(pid, signal.SIGTERM)
            except (OSError, ValueError, IndexError):
                continue
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except OSError:
                    break
                time.sleep(0.1)
        self._pid_files.clear()

    def logs(self) -> str:
        parts = []
        for log in sorted(self.root.glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-15:]
            parts.append(f"--- {log.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    # ---- clients ----------------------------------------------------------------------------------

    def run(self, cmd: list[str], check: bool = True, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, env={**self.env, **(env or {})}, capture_output=True, text=True,
                              timeout=kw.pop("timeout", 60), **kw)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
        return proc

    def sbatch(self, script: str | Path, *args: str, options: list[str] = (), env: dict | None = None,
               cwd: str | Path | None = None) -> str:
        """Submit; returns the job id (for an array job, the array's id)."""
        out = self.run(["sbatch", "--parsable", *options, str(script), *map(str, args)], env=env, cwd=cwd)
        return out.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (the first record: for an array, its first task)."""
        out = self.run(["scontrol", "show", "job", "-o", job_id]).stdout.splitlines()[0]
        fields = {}
        for item in out.split():
            if "=" in item:
                k, v = item.split("=", 1)
                fields[k] = v
        return fields

    def jobs(self, job_id: str) -> list[dict[str, str]]:
        """Every record of a job (one per array task)."""
        out = self.run(["scontrol", "show", "job", "-o", job_id]).stdout.splitlines()
        return [dict(item.split("=", 1) for item in line.split() if "=" in item) for line in out if line.strip()]

    def wait(self, job_id: str, timeout: float = 300, until=None) -> dict[str, str]:
        """Wait until `until(job)` (default: the job, every array task, has ended); returns the job."""
        ended = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                 "DEADLINE", "PREEMPTED"}
        done = until or (lambda j: j["JobState"] in ended)
        deadline = time.time() + timeout
        while time.time() < deadline:
            records = self.jobs(job_id)
            if all(done(r) for r in records):
                return records[0]
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not done after {timeout}s: {self.jobs(job_id)}\n{self.logs()}")


_cluster: SlurmCluster | None = None


@pytest.fixture(scope="session")
def slurm_cluster(request, tmp_path_factory) -> SlurmCluster:
    """One cluster for the session (shared by every test module that imports this fixture)."""
    global _cluster
    missing = missing_binaries()
    if missing:
        pytest.skip(f"Slurm/munge binaries not installed ({', '.join(missing)}): "
                    "apt-get install -y slurm-wlm munge (CI installs them)")
    if _cluster is None:
        cluster = SlurmCluster(Path(tmp_path_factory.mktemp("slurm", numbered=True)))
        request.config.add_cleanup(cluster.stop)
        try:
            cluster.start()
        except BaseException:
            cluster.stop()
            raise
        _cluster = cluster
    return _cluster


# ---- training runs shared by the Slurm, multi-node and MPI tests -------------------------------------

STEPS = 60  # enough to signal a run in the middle: a step takes 40-100 ms on a shared CPU
COMPARED = ("step", "loss", "lr", "consumed_samples", "tokens", "grad_norm")  # not the timings
_shared: dict[str, object] = {}


def run_config(tmp: Path, name: str, data_dir: Path, **train) -> Path:
    """A tiny fp32 run (tests/train_utils.py) with STEPS steps; `train` overrides train.* keys."""
    from train_utils import tiny_config, write_config

    cfg = tiny_config(tmp / name, data_dir, train={"steps": STEPS, **train},
                      checkpoint={"interval": 25, "keep_last": 2})
    return write_config(tmp / f"{name}.yaml", cfg)


def compared(metrics: list[dict]) -> list[tuple]:
    return [tuple(m.get(k) for k in COMPARED) for m in metrics]


@pytest.fixture(scope="session")
def train_data(tmp_path_factory) -> Path:
    """A prepared data directory (halo-prep's layout) of standard-library source text."""
    if "data" not in _shared:
        from train_utils import make_prepared_dir, stdlib_sources

        out = tmp_path_factory.mktemp("slurm-data")
        _shared["data"] = make_prepared_dir(out, stdlib_sources(200_000), stdlib_sources(20_000, skip=60))
    return _shared["data"]


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, train_data) -> list[dict]:
    """metrics.jsonl of one plain halo-train process, micro batch 2 x grad accum 2 (global batch 4)."""
    if "reference" not in _shared:
        from halo_pretrain.train.metrics import read_metrics
        from train_utils import run_train

        tmp = tmp_path_factory.mktemp("reference")
        config = run_config(tmp, "run", train_data)
        run_train(config, timeout=600)
        metrics = read_metrics(tmp / "run")
        assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
        _shared["reference"] = metrics
    return _shared["reference"]
