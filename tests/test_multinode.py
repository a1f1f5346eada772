"""Two nodes on one machine: slurm/train.sbatch on the test cluster's n1 and n2, two ranks each.

The same global batch (4 samples a step) as the plain single-process reference run, split as
2 nodes x 2 ranks x micro batch 1 instead of 1 process x micro batch 2 x grad accum 2: the same
samples in the same steps, so the same losses up to float rounding in the gradient all-reduce.
"""

from __future__ import annotations

import pytest

from slurm_cluster import assert_same_training, reference_run, run_config, slurm_cluster, train_data  # noqa: F401
from train_utils import REPO, train_env

pytestmark = pytest.mark.slow


def test_two_nodes_of_two_ranks_train_like_one_process_with_the_same_global_batch(slurm_cluster, train_data,
                                                                                   reference_run, tmp_path):
    from halo_pretrain.train.metrics import read_metrics

    config = run_config(tmp_path, "run", train_data, micro_batch_size=1, grad_accum=1)
    job = slurm_cluster.sbatch(REPO / "slurm" / "train.sbatch", "--config", config, cwd=tmp_path,
                               options=["--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=0",
                                        "--cpus-per-task=1", f"--output={tmp_path}/job-%j.out"],
                               env={**train_env(), "HALO_SLURM_CPU": "1"})
    info = slurm_cluster.wait(job)
    log = (tmp_path / f"job-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["NodeList"] == "n[1-2]" and info["NumNodes"] == "2", log
    assert "rendezvous 127.0.0.1:" in log and "2 node(s) x 2 = 4 ranks" in log
    assert "global batch 4 = micro 1 x accum 1 x world 4" in log

    rank_logs = sorted((tmp_path / "run" / "logs" / f"slurm-{job}" / "restart-0").glob("rank-*.log"))
    assert [p.name for p in rank_logs] == [f"rank-{r}.log" for r in range(4)]

    assert_same_training(read_metrics(tmp_path / "run"), reference_run)
