"""One rank of a 2-rank CPU run killed, or frozen: the other stops within seconds with a message naming
it (pid and host), not after the process group's 30-minute timeout, and the rerun resumes. The ranks are
started as plain processes (as two nodes' launchers would start them), so nothing but halo-train's own
peer watch ends the survivor; the killed rank's test goes through the deepspeed launcher, the user's path."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from halo_pretrain.train.distributed import free_port
from halo_pretrain.train.metrics import read_metrics
from train_utils import REPO, make_prepared_dir, run_train, stdlib_sources, tiny_config, train_command, train_env, \
    write_config

pytestmark = pytest.mark.slow
HOST = socket.gethostname()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    docs = stdlib_sources(200_000, skip=60)
    return make_prepared_dir(tmp_path_factory.mktemp("corpus"), docs[:-3], docs[-3:], docs_per_shard=30)


def make_config(tmp_path: Path, corpus: Path, **train) -> Path:
    cfg = tiny_config(tmp_path / "run", corpus, train={"steps": 100000, **train},
                      checkpoint={"interval": 3, "keep_last": 2})
    return write_config(tmp_path / "run.yaml", cfg)


def start_ranks(config: Path, tmp_path: Path, world: int = 2) -> list[subprocess.Popen]:
    """The ranks as separate processes with torch-style variables, no launcher above them."""
    port, procs = free_port(), []
    for rank in range(world):
        env = train_env()
        env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        out = open(tmp_path / f"rank{rank}.log", "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "halo_pretrain.train", "--config", str(config)],
                                      env=env, cwd=REPO, text=True, stdout=out, stderr=subprocess.STDOUT))
    return procs


def wait_for_checkpoint(run_dir: Path, procs, timeout: float = 240) -> None:
    """Until a checkpoint is complete and a few more steps are logged."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if len(read_metrics(run_dir)) >= 5 and newest_checkpoint(run_dir):
            return
        for p in procs:
            assert p.poll() is None, f"a rank ended early with {p.returncode}"
        time.sleep(0.1)
    raise AssertionError("no checkpoint in time")


def newest_checkpoint(run_dir: Path) -> int:
    done = [int(p.parent.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*/complete.json")]
    return max(done, default=0)


def wait_exit(proc: subprocess.Popen, limit: float) -> float:
    """Seconds until `proc` ended; fails past `limit`."""
    t0 = time.time()
    try:
        proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the surviving rank still runs {limit:.0f} s after its peer was lost") from None
    return time.time() - t0


def end_all(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def resume_and_check(config: Path, run_dir: Path, saved: int) -> None:
    """The same command again (through the deepspeed launcher) resumes from the newest checkpoint."""
    assert not (run_dir / "halo-train.lock").exists()  # the survivor released run.dir on its way out
    proc = run_train(config, nproc=2, overrides=[f"train.exit_at_step={saved + 2}"])
    assert f"resumed from step {saved} " in proc.stdout
    assert newest_checkpoint(run_dir) == saved + 2
    steps = [m["step"] for m in read_metrics(run_dir)]
    assert steps == list(range(1, saved + 3))


@pytest.mark.parametrize("frozen", [1, 0])
def test_a_frozen_rank_is_lost_after_the_peer_timeout(tmp_path, corpus, frozen):
    """SIGSTOP: the process lives but sends nothing, as a hung rank or a vanished node. Rank 0 frozen
    freezes the rendezvous store it serves too."""
    config = make_config(tmp_path, corpus, peer_timeout=4)
    run_dir = tmp_path / "run"
    procs = start_ranks(config, tmp_path)
    survivor = procs[1 - frozen]
    try:
        wait_for_checkpoint(run_dir, procs)
        victim = procs[frozen].pid
        procs[frozen].send_signal(signal.SIGSTOP)
        took = wait_exit(survivor, 60)
    finally:
        end_all(procs)
    log = (tmp_path / f"rank{1 - frozen}.log").read_text()
    assert survivor.returncode == 5, log[-3000:]
    if frozen == 1:
        assert re.search(rf"rank 0: error: rank 1 \(pid {victim} on {re.escape(HOST)}\) sent no heartbeat for [45] s "
                         r"\(train.peer_timeout=4\): it hangs, or its node is lost", log)
    else:
        assert f"rank 1: error: rank 0 (pid {victim} on {HOST}), which serves the rendezvous store at 127.0.0.1:" in log
        assert "it died, hangs, or its node is lost" in log
    assert 4 <= took < 20
    assert not (run_dir / "halo-train.lock").exists() or frozen == 0  # rank 0 released it on its way out


def test_a_killed_rank_is_named_by_the_other_which_stops_within_seconds_and_the_rerun_resumes(tmp_path, corpus):
    """Through the deepspeed launcher, as launch/single_node.sh runs it."""
    config = make_config(tmp_path, corpus)
    run_dir = tmp_path / "run"
    launcher = subprocess.Popen(train_command(config, 2), env=train_env(), cwd=REPO, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for_checkpoint(run_dir, [launcher])
        ranks = {int(p.environ()["RANK"]): p for p in psutil.Process(launcher.pid).children(recursive=True)
                 if "RANK" in p.environ()}  # the runner's child, deepspeed's launch.py, starts the ranks
        assert sorted(ranks) == [0, 1]
        victim = ranks[1].pid
        ranks[1].kill()
        took = wait_exit(launcher, 45)
        saved = newest_checkpoint(run_dir)
    finally:
        end_all([launcher])
    out = launcher.stdout.read()
    assert f"halo-train: rank 0: error: rank 1 (pid {victim} on {HOST}) died: its process is gone" in out, out[-3000:]
    assert "Rerun the same command to resume from the newest checkpoint" in out
    assert launcher.returncode != 0 and took < 15
    resume_and_check(config, run_dir, saved)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def watches():
    """Three ranks' watches in this process on a real TCP store, checked by hand with a clock of the test's."""
    from torch.distributed import TCPStore

    from halo_pretrain.train.peers import PeerWatch

    server = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    clock = Clock()
    ranks = [PeerWatch(r, 3, "127.0.0.1", server.port, timeout_s=30, clock=clock) for r in range(3)]
    for w in ranks:
        w.connect()
    yield ranks, clock
    del server


def check_all(ranks, settle=True, skip=()):
    return [None if w.rank in skip else w._check(settle)[0] for w in ranks]


def test_a_rank_silent_for_the_peer_timeout_is_lost(watches):
    ranks, clock = watches
    assert check_all(ranks) == [None, None, None]
    assert ranks[0]._check(True)[0] is None  # rank 0 has seen every rank's latest beat
    pid = ranks[0].me.pid
    clock.now += 29
    assert check_all(ranks, skip={2}) == [None, None, None]  # rank 2 silent for 29 s: not yet
    clock.now += 2
    assert check_all(ranks, skip={2})[0] == (f"rank 2 (pid {pid} on {HOST}) sent no heartbeat for 31 s "
                                            "(train.peer_timeout=30): it hangs, or its node is lost")


def test_a_clean_end_is_never_a_loss_and_an_error_is_after_its_grace(watches):
    from halo_pretrain.train.peers import ENDED_GRACE_S, Bounded

    ranks, clock = watches
    check_all(ranks)
    Bounded(lambda: ranks[2].store.append("halo-train/peers/ended", "2:0;")).wait(2)
    clock.now += 100  # long past the peer timeout: an ended rank is not silent
    assert check_all(ranks, skip={2}) == [None, None, None]
    Bounded(lambda: ranks[1].store.append("halo-train/peers/ended", "1:?;")).wait(2)
    assert ranks[0]._check(settle=True)[0] is None  # it may be the error rank 0 is about to meet too
    message = ranks[0]._check(settle=False)[0]  # a collective failed: say so at once
    assert message.startswith("rank 1 (pid ") and "ended with an error (its log says why)" in message
    clock.now += ENDED_GRACE_S
    assert ranks[0]._check(settle=True) == (message, True)
    ranks[0]._announce(message)
    assert ranks[2]._check(settle=True) == (f"rank 0 reports: {message}", False)
