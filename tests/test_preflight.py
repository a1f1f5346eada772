"""Pre-flight checks: the memory estimate, its error before an OOM (CPU RAM and CUDA memory, faked small),
the vocabulary warning, and DeepSpeed's unused CPU shared-memory op not being built."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from halo_pretrain.config import get_preset
from halo_pretrain.train import preflight
from halo_pretrain.train.engine import BatchPlan
from halo_pretrain.train.preflight import (GIB, check_before_start, estimate_memory, memory_error,
                                           vocabulary_warning)
from halo_pretrain.train.run_config import ConfigError, load_run_config
from train_utils import REPO, make_prepared_dir, stdlib_sources, train_env

P125 = 114_174_720  # the 125m preset's parameters (tied embeddings)


def run_config(*overrides: str):
    base = ["data.path=unused", "train.seq_len=1024", "train.micro_batch_size=2", "train.steps=1", "run.dir=unused"]
    return load_run_config(None, base + list(overrides))


class Stream:
    """What check_before_start reads of the training stream: the first dataset's manifest."""

    def __init__(self, vocab_size: int, tokenizer: str):
        manifest = type("Manifest", (), {"vocab_size": vocab_size, "tokenizer": tokenizer})()
        self.datasets = [type("Dataset", (), {"manifest": manifest})()]


@pytest.mark.parametrize("precision,zero,world,offload,weights,grads,optimizer,offloaded", [
    ("fp32", 0, 1, False, 4, 4, 8, 0),
    ("fp32", 1, 4, False, 4, 4, 2, 0),  # ZeRO-1 partitions the optimizer state
    ("bf16", 2, 4, False, 2, 0.5, 3, 0),  # ZeRO-2 the gradients too; mixed: fp32 master + 2 moments = 12 B
    ("bf16", 3, 4, False, 0.5, 0.5, 3, 0),  # ZeRO-3 the weights too
    ("bf16", 2, 4, True, 2, 0.5, 0, 3),  # offload: the optimizer state lives in host RAM
])
def test_states_per_rank_follow_zero_and_precision(precision, zero, world, offload, weights, grads, optimizer,
                                                   offloaded):
    cfg = run_config(f"train.precision={precision}", f"deepspeed.zero_stage={zero}", f"deepspeed.offload={offload}")
    est = estimate_memory(cfg, get_preset("125m"), "triton", 2, world)
    assert est.parameters == P125
    assert (est.weights, est.gradients, est.optimizer, est.offloaded) == \
        (weights * P125, grads * P125, optimizer * P125, offloaded * P125)


def test_activations_scale_with_tokens_and_shrink_with_checkpointing():
    halo = get_preset("125m")
    cfg = run_config("train.precision=bf16")
    act = lambda b, every=0: preflight.activation_bytes(halo, "triton", b, 1024, "bf16", every)  # noqa: E731
    # per token and layer 11 H + 5 KV + 4 F = 17,920 values of 2 bytes; (12 + 2) blocks; logits of 2,048 tokens
    assert act(2) == 2048 * 2 * 14 * 17_920 + 2048 * 50_304 * 10 + 4 * 2048 * 2 * 768
    assert act(4) - act(2) == 2048 * 2 * 14 * 17_920 + 2048 * 50_304 * 10 + 4 * 2048 * 2 * 768
    # every block checkpointed: its input kept (768 values), one block recomputed at a time
    assert act(2, every=1) == 2048 * 2 * (17_920 + 12 * 768) + 2048 * 50_304 * 10 + 4 * 2048 * 2 * 768
    # the gather backend also keeps every query's 75 slots (64 window, 5 dilated, 2 random, 4 globals) of
    # gathered keys and values (2 x 256 wide) and 4 score tensors of 12 heads
    gather = estimate_memory(cfg, halo, "gather", 2, 1).activations
    assert gather - act(2) == 2048 * 2 * 14 * (2 * 75 * 256 + 4 * 12 * 75)
    compiled = run_config("train.precision=bf16", "train.compile=true")  # fitted to the H100 benchmark runs
    assert estimate_memory(compiled, halo, "triton", 2, 1).activations == pytest.approx(0.7 * act(2))


@pytest.mark.parametrize("backend", ["dense", "gather"])
def test_estimate_is_near_a_real_eager_step(backend):
    """Peak resident memory of two real CPU steps (model, AdamW, forward and backward) against the estimate."""
    code = """
import json, resource, sys, torch
from halo_pretrain.config import get_preset
from halo_pretrain.model import HaloSModel
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
halo = get_preset("small", attention=sys.argv[1], max_seq_len=512)
x = torch.randint(0, halo.vocab_size, (8, 513))
base = rss()
model = HaloSModel(halo)
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
for _ in range(2):
    _, loss = model(x[:, :-1], labels=x[:, 1:], return_logits=False)
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=False)
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base))
"""
    proc = subprocess.run([sys.executable, "-c", code, backend], env=train_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    measured = json.loads(proc.stdout.splitlines()[-1])
    cfg = run_config("train.seq_len=512", "train.micro_batch_size=8", "train.precision=fp32",
                     "deepspeed.zero_stage=0", "model.preset=small", "model.max_seq_len=512")
    estimate = estimate_memory(cfg, cfg.halo_config(), backend, 8, 1).total
    assert 0.8 * measured < estimate < 1.45 * measured, (estimate / GIB, measured / GIB)


def test_cpu_run_that_cannot_fit_is_refused_with_the_numbers(monkeypatch):
    monkeypatch.setattr(preflight, "host_memory_available", lambda: 1.0 * GIB)
    cfg = run_config("train.precision=fp32", "deepspeed.zero_stage=0", "model.preset=small")
    halo = cfg.halo_config()
    need = estimate_memory(cfg, halo, "gather", 2, 1)
    with pytest.raises(ConfigError) as e:
        check_before_start(cfg, halo, BatchPlan(2, 1, 1), torch.device("cpu"), Stream(257, "byte"))
    assert str(e.value) == (
        f"this run needs about {need.total / GIB:.1f} GiB but this machine's RAM has 1.0 GiB free: 3.6M parameters: "
        f"weights 0.01 GiB, gradients 0.01 GiB, optimizer state 0.03 GiB, activations {need.activations / GIB:.2f} "
        "GiB per rank (micro batch 2 x seq_len 1024, fp32, ZeRO-0); it would run out of memory. Try a smaller "
        "train.micro_batch_size (now 2; raise train.grad_accum to keep the global batch), "
        "train.activation_checkpointing=1, a shorter train.seq_len, or a smaller model "
        "(train.check_memory=false skips this check)")
    assert 1.0 * GIB < need.total < 3 * GIB
    monkeypatch.setattr(preflight, "host_memory_available", lambda: 3.0 * GIB)  # enough: no error
    check_before_start(cfg, halo, BatchPlan(2, 1, 1), torch.device("cpu"), Stream(257, "byte"))
    monkeypatch.setattr(preflight, "host_memory_available", lambda: 0.1 * GIB)
    off = run_config("train.precision=fp32", "deepspeed.zero_stage=0", "model.preset=small", "train.check_memory=false")
    check_before_start(off, off.halo_config(), BatchPlan(2, 1, 1), torch.device("cpu"), Stream(257, "byte"))


def test_cuda_run_that_cannot_fit_is_refused_against_the_gpus_free_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * GIB, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    cfg = run_config("train.precision=bf16", "deepspeed.zero_stage=1", "train.seq_len=4096",
                     "train.micro_batch_size=8", "model.preset=125m", "model.max_seq_len=4096")
    halo = cfg.halo_config()
    need = estimate_memory(cfg, halo, "triton", 8, 8)
    with pytest.raises(ConfigError, match=rf"needs about {need.total / GIB:.1f} GiB but GPU 0 \(NVIDIA H100 80GB "
                                          r"HBM3\) has 10\.0 GiB free: 114\.2M parameters: weights 0\.21 GiB, "
                                          r"gradients 0\.21 GiB, optimizer state 0\.16 GiB"):
        check_before_start(cfg, halo, BatchPlan(8, 8, 8), torch.device("cuda", 0), Stream(50257, "gpt2"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (79 * GIB, 80 * GIB))
    check_before_start(cfg, halo, BatchPlan(8, 8, 8), torch.device("cuda", 0), Stream(50257, "gpt2"))
    # ZeRO offload: the optimizer state must fit the host RAM instead
    monkeypatch.setattr(preflight, "host_memory_available", lambda: 0.5 * GIB)
    off = run_config("train.precision=bf16", "deepspeed.zero_stage=2", "deepspeed.offload=true",
                     "train.micro_batch_size=1", "model.preset=125m")
    with pytest.raises(ConfigError, match=r"ZeRO offload keeps 1\.28 GiB in host RAM \(1 x 1\.28 GiB per rank\), "
                                          r"which has 0\.5 GiB free"):
        check_before_start(off, off.halo_config(), BatchPlan(1, 1, 1), torch.device("cuda", 0), Stream(50257, "gpt2"))


def test_ranks_of_one_machine_share_its_ram():
    cfg = run_config("train.precision=fp32", "deepspeed.zero_stage=0")
    est = estimate_memory(cfg, get_preset("tiny"), "gather", 2, 2)
    assert memory_error(est, 1.5 * est.total, "this machine's RAM", 1, cfg) is None
    message = memory_error(est, 1.5 * est.total, "this machine's RAM", 2, cfg)
    assert message.startswith(f"this run needs about {2 * est.total / GIB:.1f} GiB (2 ranks on this machine)")


def test_vocabulary_far_larger_than_the_data_warns_with_the_numbers(capsys):
    assert vocabulary_warning(50_304, 257, "byte", P125, 768, True) == (
        "model.vocab_size=50,304 but the data (tokenizer 'byte') has 257 token ids: 38.4M of the model's 114.2M "
        "parameters (34%) are embedding rows no token uses, and every step computes 50,304 logits per token; set "
        "model.vocab_size=320 or use a preset made for this tokenizer")
    assert vocabulary_warning(320, 257, "byte", 1_027_968, 128, True) is None  # padded to a multiple of 64
    assert vocabulary_warning(50_304, 50_257, "gpt2", P125, 768, True) is None
    said = []
    cfg = run_config("model.preset=125m", "train.check_memory=false")
    check_before_start(cfg, cfg.halo_config(), BatchPlan(2, 1, 1), torch.device("cpu"), Stream(257, "byte"),
                       say=said.append)
    assert said == ["warning: " + vocabulary_warning(50_304, 257, "byte", P125, 768, True)]


def test_125m_on_byte_data_warns_and_stops_before_spending_memory(tmp_path):
    """The issue's run: --config 125m on byte data ran 4 minutes and was killed at 21.5 GB."""
    data = make_prepared_dir(tmp_path / "data", stdlib_sources(100_000), stdlib_sources(20_000, skip=50))
    proc = subprocess.run([sys.executable, "-m", "halo_pretrain.train", "--config", "125m", f"data.path={data}",
                           f"run.dir={tmp_path / 'run'}", "train.micro_batch_size=64"],
                          env=train_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "[halo-train] warning: model.vocab_size=50,304 but the data (tokenizer 'byte') has 257 token ids" in proc.stdout
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("halo-train: error: this run needs about ") and "114.2M parameters" in error
    assert "micro batch 64 x seq_len 4096, bf16, ZeRO-1" in error
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_deepspeeds_cpu_shared_memory_op_is_not_built(monkeypatch, tmp_path):
    """Training never uses it (only DeepSpeed's inference allreduce does); building it cost a minute a machine."""
    import deepspeed.ops
    from deepspeed.comm.torch import build_shm_op

    from halo_pretrain.train.distributed import skip_cpu_shm_op

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setitem(deepspeed.ops.__compatible_ops__, "deepspeed_shm_comm", True)
    skip_cpu_shm_op()
    assert deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] is False
    assert build_shm_op() is None
    assert not Path(tmp_path / "ext").exists()
