"""halo-train's configuration, batch arithmetic, DeepSpeed config, schedules, parameter groups, rank discovery."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from halo_pretrain.model import HaloSModel
from halo_pretrain.train.distributed import discover, first_slurm_host
from halo_pretrain.train.engine import batch_plan, build_ds_config
from halo_pretrain.train.optim import SkippableAdamW, param_groups
from halo_pretrain.train.run_config import RECIPES_DIR, ConfigError, load_run_config
from halo_pretrain.train.schedule import learning_rate
from train_utils import REPO, tiny_config, train_env, write_config


@pytest.fixture
def config_file(tmp_path):
    return write_config(tmp_path / "run.yaml", tiny_config(tmp_path / "run", tmp_path / "data"))


def test_overrides_and_resolved_values(config_file):
    cfg = load_run_config(config_file, ["train.steps=17", "optim.lr=1e-3", "model.num_layers=3",
                                        "deepspeed.extra={zero_optimization: {reduce_bucket_size: 1000}}"])
    assert cfg.train.steps == 17 and cfg.optim.lr == 1e-3
    halo = cfg.halo_config()
    assert halo.num_layers == 3 and halo.hidden_size == 64 and halo.seed == cfg.seed
    assert cfg.deepspeed.extra == {"zero_optimization": {"reduce_bucket_size": 1000}}
    resolved = config_file.with_name("resolved.yaml")
    resolved.write_text(cfg.to_yaml())
    assert load_run_config(resolved) == cfg  # the resolved YAML alone describes the run


def test_unknown_key_in_file_names_line_and_nearest_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("seed: 1\ntrain:\n  seq_len: 32\n  micro_batch: 2\n  steps: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:4: unknown key 'train\.micro_batch'; did you mean "
                                          r"'train\.micro_batch_size'\?"):
        load_run_config(path)


def test_unknown_override_and_bad_values_name_the_key(config_file):
    with pytest.raises(ConfigError, match=r"override 'chekpoint.interval=5': unknown key 'chekpoint'; did you mean 'checkpoint'"):
        load_run_config(config_file, ["chekpoint.interval=5"])
    with pytest.raises(ConfigError, match=r"override 'model.hidden_sise=8'.*did you mean 'model.hidden_size'"):
        load_run_config(config_file, ["model.hidden_sise=8"])
    with pytest.raises(ConfigError, match=r"override 'train.steps=many'.*'train.steps'.*integer"):
        load_run_config(config_file, ["train.steps=many"])
    bad = yaml_like(config_file)
    bad["train"]["precision"] = "fp8"
    with pytest.raises(ConfigError, match=r"fp8\.yaml:\d+: 'train.precision'.*'bf16', 'fp16' or 'fp32'"):
        load_run_config(write_config(config_file.with_name("fp8.yaml"), bad))
    with pytest.raises(ConfigError, match=r"train.seq_len=128 exceeds the model's max_seq_len=64"):
        load_run_config(config_file, ["train.seq_len=128"])
    with pytest.raises(ConfigError, match=r"model: HaloConfig.hidden_size=66: must be divisible by num_heads=4"):
        load_run_config(config_file, ["model.hidden_size=66"])
    with pytest.raises(ConfigError, match="exactly one of data.path"):
        load_run_config(config_file, ["data.blend=[{path: x, weight: 1}]"])
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_run_config(config_file, ["train.steps"])


def yaml_like(path):
    import yaml

    return yaml.safe_load(Path(path).read_text())


def test_recipes_resolve_by_name_and_validate():
    names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    assert {"quickstart", "125m", "125m-dense"} <= set(names) and any("long" in n for n in names)
    for name in names:
        cfg = load_run_config(name)
        assert cfg.train.seq_len <= cfg.halo_config().max_seq_len
    assert load_run_config("125m-dense").halo_config().attention == "dense"
    with pytest.raises(ConfigError, match="neither a file nor a built-in recipe"):
        load_run_config("no-such-recipe")


def test_batch_arithmetic(config_file):
    cfg = load_run_config(config_file, ["train.grad_accum=null", "train.global_batch_size=16"])
    plan = batch_plan(cfg, world_size=2)
    assert (plan.micro_batch_size, plan.grad_accum, plan.global_batch_size) == (2, 4, 16)
    with pytest.raises(ConfigError, match=r"global_batch_size=18 is not divisible by .*micro_batch_size=2 x world "
                                          r"size 2 = 4"):
        batch_plan(load_run_config(config_file, ["train.grad_accum=null", "train.global_batch_size=18"]), 2)
    with pytest.raises(ConfigError, match=r"global_batch_size=16 != .*micro_batch_size=2 x train.grad_accum=2 x "
                                          r"world size 2 = 8.*grad_accum=4"):
        batch_plan(load_run_config(config_file, ["train.global_batch_size=16"]), 2)


def test_ds_config_is_filled_from_the_run_config(config_file):
    for stage in (0, 1, 2, 3):
        cfg = load_run_config(config_file, [f"deepspeed.zero_stage={stage}", "train.precision=bf16",
                                            "train.grad_clip=0.5"])
        ds = build_ds_config(cfg, batch_plan(cfg, 2))
        assert ds["zero_optimization"]["stage"] == stage
        assert ds["train_batch_size"] == 8 and ds["gradient_accumulation_steps"] == 2
        assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_clipping"] == 0.5
        assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    cfg = load_run_config(config_file, ["deepspeed.zero_stage=3", "deepspeed.offload=true", "train.precision=fp16"])
    ds = build_ds_config(cfg, batch_plan(cfg, 1))
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0  # dynamic loss scaling
    with pytest.raises(ConfigError, match="offload=true needs deepspeed.zero_stage 2 or 3"):
        build_ds_config(load_run_config(config_file, ["deepspeed.offload=true"]), batch_plan(cfg, 1))


def test_optional_logging_packages_are_checked_at_start(config_file, monkeypatch):
    """wandb and TensorBoard are optional: asked for but missing is an error at start, not asked for (or wandb
    disabled, by the key or by WANDB_MODE) it is no error. The packages' absence is simulated."""
    import importlib.util

    from halo_pretrain.train.metrics import check_logging_packages

    real_find_spec, missing = importlib.util.find_spec, set()
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in missing else real_find_spec(name, *a))
    wandb = lambda *keys: load_run_config(config_file, ["logging.wandb_project=p", *keys])  # noqa: E731
    missing.update({"wandb", "tensorboard"})
    with pytest.raises(ConfigError, match=r"logging.wandb_project is set but the 'wandb' package is not installed: "
                                          r"pip install wandb, or unset logging.wandb_project"):
        check_logging_packages(wandb("logging.wandb_mode=offline"))
    with pytest.raises(ConfigError, match="logging.tensorboard is set but the 'tensorboard' package is not "
                                          "installed: pip install tensorboard"):
        check_logging_packages(load_run_config(config_file, ["logging.tensorboard=true"]))
    monkeypatch.setenv("WANDB_MODE", "online")
    with pytest.raises(ConfigError, match="'wandb' package is not installed"):
        check_logging_packages(wandb())
    check_logging_packages(wandb("logging.wandb_mode=disabled"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    check_logging_packages(wandb())  # logging.wandb_mode unset: WANDB_MODE decides
    check_logging_packages(load_run_config(config_file))  # nothing asked for
    missing.clear()
    monkeypatch.setenv("WANDB_MODE", "online")
    check_logging_packages(wandb())  # installed


def test_wandb_mode_left_unset_follows_WANDB_MODE_and_online_without_an_api_key_logs_offline(
        config_file, tmp_path, monkeypatch):
    from halo_pretrain.train.metrics import start_wandb, wandb_mode

    unset = load_run_config(config_file, ["logging.wandb_project=p"]).logging
    assert unset.wandb_mode is None
    assert wandb_mode(unset, {"WANDB_MODE": "offline"}) == "offline"
    assert wandb_mode(unset, {"WANDB_MODE": "dryrun"}) == "offline"  # wandb's older name
    assert wandb_mode(unset, {}) == "online"
    set_ = load_run_config(config_file, ["logging.wandb_project=p", "logging.wandb_mode=disabled"]).logging
    assert wandb_mode(set_, {"WANDB_MODE": "online"}) == "disabled"  # the key wins over the environment
    for key in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc, no wandb settings: no API key anywhere
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "home" / ".config" / "wandb"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = load_run_config(config_file, ["logging.wandb_project=p", f"run.dir={run_dir}"])
    said = []
    run = start_wandb(cfg, run_dir, wandb_mode(cfg.logging), say=said.append)
    try:
        assert run.offline
        run.log({"loss": 1.0}, step=1)
    finally:
        run.finish()
    assert len(said) == 1 and "wandb could not log online (UsageError: No API key configured" in said[0]
    assert f"upload it later with `wandb sync {run_dir / 'wandb'}/offline-run-*`" in said[0]
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1


def test_schedules():
    kw = dict(lr=1.0, min_lr=0.1, total_steps=100, warmup_steps=10)
    cos = [learning_rate(s, schedule="cosine", **kw) for s in range(100)]
    assert cos[0] == pytest.approx(0.1) and cos[9] == pytest.approx(1.0)
    assert cos[10] == pytest.approx(1.0) and cos[55] == pytest.approx(0.55)
    assert cos[99] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 89 / 90)))
    assert all(a >= b for a, b in zip(cos[10:], cos[11:]))
    wsd = [learning_rate(s, schedule="wsd", decay_fraction=0.2, **kw) for s in range(101)]
    assert wsd[10:80] == [1.0] * 70 and wsd[90] == pytest.approx(0.55) and wsd[100] == pytest.approx(0.1)
    assert learning_rate(50, schedule="constant", **kw) == 1.0


def test_param_groups_decay_matrices_only():
    model = HaloSModel(load_run_config("quickstart").halo_config())
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert "embed.weight" in no_decay_names and "norm.weight" in no_decay_names
    assert {"blocks.0.attn.global_k", "blocks.0.attn.global_v", "blocks.0.attn_norm.weight"} <= no_decay_names
    assert "blocks.0.attn.q_proj.weight" in decay_names and "blocks.0.mlp.down_proj.weight" in decay_names
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(decay_names | no_decay_names) == len(list(model.parameters()))


def test_skipped_step_leaves_weights_and_moments():
    w = torch.nn.Parameter(torch.ones(3))
    opt = SkippableAdamW([w], lr=0.1)
    w.grad = torch.ones(3)
    opt.step()
    before, moments = w.detach().clone(), opt.state[w]["exp_avg"].clone()
    w.grad = torch.full((3,), float("nan"))
    opt.skip_next = True
    opt.step()
    assert torch.equal(w.detach(), before) and torch.equal(opt.state[w]["exp_avg"], moments)
    w.grad = torch.ones(3)
    opt.step()  # the flag lasts one step
    assert not torch.equal(w.detach(), before)


def test_rng_states_round_trip_through_json():
    import json
    import random

    import numpy as np

    from halo_pretrain.train.checkpoint import rng_state, set_rng_state

    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    saved = json.loads(json.dumps(rng_state()))
    first = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(7), np.random.rand(7), random.random()
    set_rng_state(saved)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


class FakeComm:
    def __init__(self):
        self.sent = None

    def bcast(self, value, root):
        assert root == 0
        self.sent = value if value is not None else self.sent
        return self.sent or ("rank0-host", 12345)


def test_rank_discovery_for_each_launcher():
    torchrun = discover({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n0", "MASTER_PORT": "6000"})
    assert (torchrun.rank, torchrun.world_size, torchrun.local_rank, torchrun.master_addr, torchrun.master_port) == \
        (3, 8, 1, "n0", 6000)
    comm = FakeComm()
    mpi0 = discover({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0"},
                    mpi_comm=comm)
    mpi2 = discover({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0"},
                    mpi_comm=comm)
    assert mpi0.launcher == mpi2.launcher == "mpi" and (mpi2.rank, mpi2.world_size) == (2, 4)
    assert (mpi2.master_addr, mpi2.master_port) == (mpi0.master_addr, mpi0.master_port)  # rank 0's, broadcast
    slurm = discover({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "1234",
                      "SLURM_JOB_NODELIST": "gpu[07-08]"})
    assert (slurm.rank, slurm.world_size, slurm.local_rank, slurm.launcher) == (5, 8, 1, "slurm")
    assert slurm.master_addr == "gpu07" and slurm.master_port == 21234
    single = discover({})
    assert (single.rank, single.world_size, single.launcher) == (0, 1, "single") and single.master_port > 0
    assert first_slurm_host("a1,b2") == "a1" and first_slurm_host("node[3,5-6]") == "node3"
    with pytest.raises(ValueError, match="RANK='x' is not an integer"):
        discover({"RANK": "x", "WORLD_SIZE": "2"})


def test_cli_config_error_exit_code_and_message(tmp_path, config_file):
    proc = subprocess.run([sys.executable, "-m", "halo_pretrain.train", "--config", str(config_file),
                           "train.micro_batch_sz=4"], env=train_env(), cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unknown key 'train.micro_batch_sz'; did you mean 'train.micro_batch_size'?" in proc.stderr
    printed = subprocess.run([sys.executable, "-m", "halo_pretrain.train", "--config", "quickstart", "--print-config",
                              "train.steps=5"], env=train_env(), cwd=REPO, capture_output=True, text=True)
    assert printed.returncode == 0 and "steps: 5" in printed.stdout


def test_ctrl_c_is_a_stop_request_and_a_second_one_stops_at_once():
    script = """
import os, signal
from halo_pretrain.train.signals import StopRequest
stop = StopRequest(announce=True).install()
for sig in (signal.SIGTERM, signal.SIGUSR1):
    assert signal.getsignal(sig) == stop._handle, sig
os.kill(os.getpid(), signal.SIGINT)
print("requested", stop.signal_name, flush=True)
os.kill(os.getpid(), signal.SIGINT)
print("survived the second Ctrl-C", flush=True)
"""
    proc = subprocess.run([sys.executable, "-c", script], env=train_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGINT, proc.stderr
    assert proc.stdout == "requested SIGINT\n"
    assert "press Ctrl-C again to stop at once without saving" in proc.stderr
