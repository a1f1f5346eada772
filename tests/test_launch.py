"""Every launch/ script that can run on a CPU runs here, for real; single_gpu_debug.sh must refuse clearly.
launch/quickstart.sh runs in full, as the README says, in tests/test_readme.py."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from halo_pretrain.train.distributed import free_port
from halo_pretrain.train.metrics import read_metrics
from train_utils import REPO, losses, make_prepared_dir, stdlib_sources, tiny_config, train_env, write_config

pytestmark = pytest.mark.slow
LAUNCH = REPO / "launch"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    docs = stdlib_sources(200_000, skip=80)
    return make_prepared_dir(tmp_path_factory.mktemp("corpus"), docs[:-2], docs[-2:])


def config(tmp_path: Path, corpus: Path, name: str, **sections) -> Path:
    cfg = tiny_config(tmp_path / name, corpus, train={"steps": 3}, checkpoint={"interval": 3}, **sections)
    return write_config(tmp_path / f"{name}.yaml", cfg)


def script(name: str, args: list[str], env: dict | None = None, timeout: float = 300, **kw):
    return subprocess.Popen(["bash", str(LAUNCH / name), *args], env={**train_env(), **(env or {})}, cwd=kw.get("cwd"),
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc, timeout: float = 300):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-3000:]}\n{err[-3000:]}"
    return out, err


def test_cpu_debug(tmp_path, corpus):
    out, err = finish(script("cpu_debug.sh", ["--config", str(config(tmp_path, corpus, "cpu"))]))
    assert "+ DS_ACCELERATOR=cpu" in err and "-m halo_pretrain.train" in err  # it prints what it runs
    assert [m["step"] for m in read_metrics(tmp_path / "cpu")] == [1, 2, 3]


def test_single_node_and_two_nodes_without_ssh_give_the_same_losses(tmp_path, corpus):
    """single_node.sh with 2 CPU ranks; multi_node.sh as two nodes of 1 rank each (--no_ssh --node_rank),
    the same global batch: the same loss sequence."""
    single = config(tmp_path, corpus, "single", deepspeed={"zero_stage": 2})
    port = free_port()
    out, err = finish(script("single_node.sh", ["--config", str(single)], {"NUM_GPUS": "2", "MASTER_PORT": str(port)}))
    assert "--num_gpus 2" in err and "deepspeed.launcher.runner" in err
    # DeepSpeed's CPU allreduce maps a 66 MB /dev/shm file per rank and never removes it; the trainer does
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))

    hostfile = tmp_path / "hosts"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    two = config(tmp_path, corpus, "two_nodes", deepspeed={"zero_stage": 2})
    env = {"HOSTFILE": str(hostfile), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    nodes = [script("multi_node.sh", ["--config", str(two)], {**env, "NODE_RANK": str(rank)}) for rank in (0, 1)]
    errs = [finish(node)[1] for node in nodes]
    assert "--no_ssh --node_rank 0" in errs[0] and "--no_ssh --node_rank 1" in errs[1]
    assert len(losses(tmp_path / "two_nodes")) == 3
    assert losses(tmp_path / "two_nodes") == losses(tmp_path / "single")

    # torchrun sets the same variables as the deepspeed launcher: the same run again
    torchrun = subprocess.run(["torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()), "-m",
                               "halo_pretrain.train", "--config", str(single), f"run.dir={tmp_path / 'torchrun'}"],
                              env=train_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert torchrun.returncode == 0, torchrun.stderr[-3000:]
    assert losses(tmp_path / "torchrun") == losses(tmp_path / "single")


def test_single_gpu_debug_refuses_without_a_gpu(tmp_path, corpus):
    proc = script("single_gpu_debug.sh", ["--config", str(config(tmp_path, corpus, "gpu"))])
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "no CUDA GPU visible" in err and "launch/cpu_debug.sh" in err
    assert not (tmp_path / "gpu").exists()


def test_multi_node_needs_a_hostfile():
    proc = script("multi_node.sh", ["--config", "quickstart"], {"HOSTFILE": "/no/such/hosts"})
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "HOSTFILE=/no/such/hosts does not exist" in err

