"""Exact resume with the real DeepSpeed engine on CPU, one process and two under the deepspeed launcher.

Every run here is a real `halo-train` process; an interrupted run is killed with SIGKILL (its whole
process group) and restarted with the same command. fp32 on CPU is deterministic, so a resumed
run must log exactly the uninterrupted run's losses.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from halo_pretrain.model import HaloSModel
from halo_pretrain.train.checkpoint import CheckpointError, load_model_state
from halo_pretrain.train.metrics import read_metrics
from train_utils import (losses, make_prepared_dir, run_train, run_until_killed, stdlib_sources, tiny_config,
                         write_config)

pytestmark = pytest.mark.slow

COMBOS = [(0, 1), (2, 1), (3, 1), (0, 2), (1, 2), (2, 2), (3, 2)]  # (ZeRO stage, processes)
STEPS = {(0, 1): 30}  # this one also shows the loss falling; the others are shorter
DEFAULT_STEPS = 12
INTERVAL = 4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    docs = stdlib_sources(600_000)
    return make_prepared_dir(tmp_path_factory.mktemp("stdlib"), docs[:-4], docs[-4:], docs_per_shard=40)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


def config_for(workdir: Path, corpus: Path, name: str, zero: int, nproc: int) -> Path:
    steps = STEPS.get((zero, nproc), DEFAULT_STEPS)
    cfg = tiny_config(workdir / name, corpus, deepspeed={"zero_stage": zero},
                      train={"steps": steps}, checkpoint={"interval": INTERVAL, "keep_last": 3},
                      eval={"interval": 8, "samples": 8})
    if (zero, nproc) == (0, 1):
        cfg["model"]["dropout"] = 0.1  # exact resume then needs the restored RNG states too
    return write_config(workdir / f"{name}.yaml", cfg)


_references: dict[tuple[int, int], Path] = {}


def reference(workdir: Path, corpus: Path, zero: int, nproc: int) -> Path:
    """The uninterrupted run of a combination (made once per module)."""
    if (zero, nproc) not in _references:
        config = config_for(workdir, corpus, f"ref_z{zero}_n{nproc}", zero, nproc)
        run_train(config, nproc)
        _references[(zero, nproc)] = workdir / f"ref_z{zero}_n{nproc}"
    return _references[(zero, nproc)]


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*"))


@pytest.mark.parametrize("zero,nproc", COMBOS, ids=[f"zero{z}-{n}proc" for z, n in COMBOS])
def test_kill_and_resume_gives_the_same_losses(workdir, corpus, zero, nproc):
    ref_dir = reference(workdir, corpus, zero, nproc)
    ref = read_metrics(ref_dir)
    steps = STEPS.get((zero, nproc), DEFAULT_STEPS)
    assert [m["step"] for m in ref] == list(range(1, steps + 1))
    assert [m["consumed_samples"] for m in ref] == [4 * nproc * s for s in range(1, steps + 1)]
    assert all(m["tokens"] == m["consumed_samples"] * 32 and m["grad_norm"] > 0 for m in ref)

    name = f"killed_z{zero}_n{nproc}"
    config = config_for(workdir, corpus, name, zero, nproc)
    run_dir = workdir / name
    if (zero, nproc) == (3, 2):
        # die in the middle of the step-8 save: DeepSpeed's files are written, the checkpoint is not complete
        write_config(config, {**yaml.safe_load(config.read_text()), "debug": {"kill_during_save_step": 8}})
        proc = run_train(config, nproc, check=False)
        assert proc.returncode != 0
        assert (run_dir / "checkpoints" / "step_00000008").is_dir()
        assert not (run_dir / "checkpoints" / "step_00000008" / "complete.json").exists()
        assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000004"
        write_config(config, {k: v for k, v in yaml.safe_load(config.read_text()).items() if k != "debug"})
    else:
        kill_after = random.Random(f"{zero}-{nproc}").randint(2, steps - 2)
        print(f"killing after {kill_after} logged steps")
        run_until_killed(config, nproc, kill_after)
        assert len(read_metrics(run_dir)) >= kill_after
    proc = run_train(config, nproc)
    assert "resumed from step" in proc.stdout
    resumed = read_metrics(run_dir)
    assert [m["step"] for m in resumed] == list(range(1, steps + 1))  # no step lost or repeated in the log
    assert losses(run_dir) == losses(ref_dir)  # exactly
    assert [m["consumed_samples"] for m in resumed] == [m["consumed_samples"] for m in ref]
    assert [m.get("val_loss") for m in resumed] == [m.get("val_loss") for m in ref]
    assert checkpoint_steps(run_dir) == checkpoint_steps(ref_dir)


def test_loss_falls_keep_last_and_metrics(workdir, corpus):
    ref_dir = reference(workdir, corpus, 0, 1)
    metrics = read_metrics(ref_dir)
    first, last = metrics[0]["loss"], sum(m["loss"] for m in metrics[-5:]) / 5
    print(f"loss {first:.3f} -> {last:.3f} in 30 steps")
    assert first > 5.0 and last < first - 1.5  # bytes start near ln(320) = 5.77
    assert checkpoint_steps(ref_dir) == [24, 28, 30]  # every 4 steps and at the end, the last 3 kept
    for key in ("step", "loss", "lr", "consumed_samples", "tokens", "grad_norm", "tokens_per_s", "mem_gb"):
        assert all(m[key] is not None for m in metrics), key
    evals = [m for m in metrics if "val_loss" in m]
    assert [m["step"] for m in evals] == [8, 16, 24, 30]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert evals[-1]["val_ppl"] == pytest.approx(torch.tensor(evals[-1]["val_loss"]).exp().item(), rel=1e-6)
    resolved = (ref_dir / "config.yaml").read_text()
    assert "zero_stage: 0" in resolved and "steps: 30" in resolved


def reshard_run(workdir: Path, ref_dir: Path, name: str, step: int) -> Path:
    """A copy of a finished run that stops at `step`: later checkpoints and metrics removed."""
    run_dir = workdir / name
    shutil.copytree(ref_dir, run_dir)
    for path in (run_dir / "checkpoints").glob("step_*"):
        if int(path.name.split("_")[1]) > step:
            shutil.rmtree(path)
    (run_dir / "checkpoints" / "latest").write_text(f"step_{step:08d}\n")
    cfg = yaml.safe_load((workdir / f"{ref_dir.name}.yaml").read_text())
    cfg["run"]["dir"] = str(run_dir)
    return write_config(workdir / f"{name}.yaml", cfg)


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_world_size_change_continues_the_sample_stream(workdir, corpus, before, after):
    """ZeRO-2 run on `before` processes resumed on `after` with the same global batch (grad_accum adjusted)."""
    ref_dir = reference(workdir, corpus, 2, before)
    config = reshard_run(workdir, ref_dir, f"reshard_{before}to{after}", step=4)
    grad_accum = 2 * before // after
    proc = run_train(config, after, [f"train.grad_accum={grad_accum}"])
    assert "resharded" in proc.stdout and "resumed from step 4" in proc.stdout
    ref, got = read_metrics(ref_dir), read_metrics(workdir / f"reshard_{before}to{after}")
    assert [m["step"] for m in got] == list(range(1, DEFAULT_STEPS + 1))
    # the consumed-sample position continues: step s of both runs covers the same global samples
    assert [m["consumed_samples"] for m in got] == [m["consumed_samples"] for m in ref]
    # the same weights and the same samples give the same loss, up to the summation order of another world size
    for a, b in zip(got[4:], ref[4:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-5, abs=0), a["step"]
    # a different sample (a repeated or skipped one) would move the loss far more than that
    assert min(abs(a["loss"] - b["loss"]) for a, b in zip(ref[4:], ref[5:])) > 1e-3


def test_zero3_world_size_change_is_refused_unless_allowed(workdir, corpus):
    """DeepSpeed 0.19's universal loader does not restore ZeRO-3 optimizer state exactly: refuse by default."""
    config = reshard_run(workdir, reference(workdir, corpus, 3, 2), "reshard_zero3", step=4)
    proc = run_train(config, 1, ["train.grad_accum=4"], check=False)
    assert proc.returncode == 4
    assert "written by 2 ranks with ZeRO-3; this run has 1 ranks with ZeRO-3" in proc.stderr
    assert "checkpoint.allow_inexact_zero3_reshard=true" in proc.stderr
    assert not (workdir / "reshard_zero3" / "checkpoints" / "universal").exists()


def test_zero0_and_zero3_exports_give_the_same_logits(workdir, corpus):
    z0, z3 = reference(workdir, corpus, 0, 2), reference(workdir, corpus, 3, 2)
    config0, state0 = load_model_state(z0)
    config3, state3 = load_model_state(z3)
    assert config0 == config3 and config0.hidden_size == 64
    assert set(state0) == set(state3) and "lm_head.weight" in state0
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in state3.values())
    tokens = torch.randint(0, config0.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    logits = []
    for config, state in ((config0, state0), (config3, state3)):
        model = HaloSModel(config)
        model.load_state_dict(state, strict=True)
        with torch.no_grad():
            logits.append(model(tokens))
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-5)
    # the trained weights, not the initial ones
    fresh = HaloSModel(config0)
    assert not torch.allclose(fresh.state_dict()["blocks.0.attn.q_proj.weight"], state0["blocks.0.attn.q_proj.weight"])
    _, older = load_model_state(z3, step=8)
    assert not torch.equal(older["embed.weight"], state3["embed.weight"])
    with pytest.raises(CheckpointError, match=r"no complete checkpoint of step 5; complete steps: 4, 8, 12"):
        load_model_state(z3, step=5)
