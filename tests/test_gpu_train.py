"""The GPU suite's training paths: real halo-train processes on a CUDA GPU, NCCL process group.

Exact resume for every ZeRO stage (bf16) and ZeRO-1 in fp16, by train.exit_at_step + rerun and by
SIGKILL in the middle of a checkpoint save; train.compile with activation checkpointing for the Triton
and dense backends; ZeRO-2/3 with CPU offload; the one-GPU launchers. Runs that do not depend on each
other share the GPU at once (tiny models), so the whole file takes about as long as its longest chain.
Run with `python -m pytest -q -m gpu` (benchmarks/gpu_suite.sh); skipped without CUDA.
"""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from halo_pretrain.train.metrics import read_metrics
from train_utils import REPO, make_prepared_dir, run_train, stdlib_sources, tiny_config, train_env, write_config

pytestmark = pytest.mark.gpu

STEPS = 8
RESUME_VARIANTS = {  # name: (ZeRO stage, precision)
    "zero0-bf16": (0, "bf16"), "zero1-bf16": (1, "bf16"), "zero2-bf16": (2, "bf16"),
    "zero3-bf16": (3, "bf16"), "zero1-fp16": (1, "fp16"),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    docs = stdlib_sources(400_000, skip=40)
    return make_prepared_dir(tmp_path_factory.mktemp("gpu-data"), docs[:-4], docs[-4:])


def gpu_config(run_dir: Path, data: Path, zero: int, precision: str, **sections) -> dict:
    """A small HALO-S model whose attention runs in the compiled Triton kernels (head_dim 32, GQA 2)."""
    cfg = tiny_config(run_dir, data, model={"hidden_size": 128, "num_heads": 4, "num_kv_heads": 2, "num_layers": 3,
                                            "local_window": 16, "max_seq_len": 256, "attention": "auto"},
                      train={"seq_len": 256, "steps": STEPS, "precision": precision},
                      deepspeed={"zero_stage": zero}, checkpoint={"interval": 2, "keep_last": 3},
                      eval={"interval": 4, "samples": 8})
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def metrics_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in read_metrics(run_dir)]


def run_resume_chain(tmp_path: Path, data: Path, name: str) -> dict:
    """An uninterrupted run, and the same run killed (SIGKILL) while saving step 4, rerun with
    train.exit_at_step=6, rerun to the end."""
    zero, precision = RESUME_VARIANTS[name]
    port = 29600 + 10 * list(RESUME_VARIANTS).index(name)  # the chains run at once: a port each
    whole = write_config(tmp_path / f"{name}-whole.yaml", gpu_config(tmp_path / f"{name}-whole", data, zero, precision))
    cut = write_config(tmp_path / f"{name}-cut.yaml", gpu_config(tmp_path / f"{name}-cut", data, zero, precision))
    result = {"whole": run_train(whole, gpu=True, timeout=600, port=port)}
    result["killed"] = run_train(cut, overrides=["debug.kill_during_save_step=4"], gpu=True, check=False, timeout=600,
                                 port=port + 1)
    result["killed_losses"] = metrics_losses(tmp_path / f"{name}-cut")
    result["exit_at"] = run_train(cut, overrides=["train.exit_at_step=6"], gpu=True, timeout=600, port=port + 2)
    result["last"] = run_train(cut, gpu=True, timeout=600, port=port + 3)
    result["want"] = metrics_losses(tmp_path / f"{name}-whole")
    result["got"] = metrics_losses(tmp_path / f"{name}-cut")
    return result


@pytest.fixture(scope="module")
def resume_runs(tmp_path_factory, data) -> dict:
    tmp = tmp_path_factory.mktemp("gpu-resume")
    with ThreadPoolExecutor(len(RESUME_VARIANTS)) as pool:
        futures = {name: pool.submit(run_resume_chain, tmp, data, name) for name in RESUME_VARIANTS}
        return {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize("name", list(RESUME_VARIANTS))
def test_resume_after_kill_during_save_and_exit_at_step_is_bit_exact(resume_runs, name):
    r = resume_runs[name]
    assert r["killed"].returncode == -9, f"the run was to SIGKILL itself mid-save:\n{r['killed'].stderr[-3000:]}"
    assert [s for s, _ in r["killed_losses"]] == [1, 2, 3, 4]
    assert "resumed from step 2" in r["exit_at"].stdout, r["exit_at"].stdout[-2000:]  # step 4 never completed
    assert "resumed from step 6" in r["last"].stdout, r["last"].stdout[-2000:]
    assert [s for s, _ in r["want"]] == list(range(1, STEPS + 1))
    assert all(loss is not None for _, loss in r["want"]), r["want"]
    # the four steps before the kill are a second uninterrupted run: any nondeterminism shows here too
    assert r["killed_losses"] == r["want"][:4]
    assert r["got"] == r["want"], f"{name}: resumed {r['got']} vs uninterrupted {r['want']}"
    assert r["want"][-1][1] < r["want"][0][1]


def test_nccl_runs_use_the_gpu(resume_runs):
    out = resume_runs["zero1-bf16"]["whole"].stdout
    assert "bf16, cuda" in out, out[-2000:]


@pytest.fixture(scope="module")
def compile_runs(tmp_path_factory, data) -> dict:
    """train.compile=true vs eager, both with activation checkpointing, for the Triton and dense backends."""
    tmp = tmp_path_factory.mktemp("gpu-compile")
    jobs = {}
    for attention in ("auto", "dense"):
        for compiled in (True, False):
            name = f"{attention}-{'compiled' if compiled else 'eager'}"
            cfg = gpu_config(tmp / name, data, 1, "bf16", model={"attention": attention},
                             train={"compile": compiled, "activation_checkpointing": 1, "steps": 6},
                             checkpoint={"interval": 100})
            jobs[name] = (write_config(tmp / f"{name}.yaml", cfg), tmp / f"inductor-{name}", tmp / name, 29700 + len(jobs))

    def run(job):
        config, cache, run_dir, port = job
        env = train_env(gpu=True)
        env.update(TORCHINDUCTOR_CACHE_DIR=str(cache), MASTER_PORT=str(port))
        proc = subprocess.run([sys.executable, "-m", "halo_pretrain.train", "--config", str(config)], env=env,
                              cwd=REPO, text=True, capture_output=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        code = [p.read_text() for p in cache.rglob("*.py")]
        return {"losses": [loss for _, loss in metrics_losses(run_dir)], "inductor_code": code}

    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {name: pool.submit(run, job) for name, job in jobs.items()}
        return {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize("attention", ["auto", "dense"])
def test_compile_with_activation_checkpointing_trains_the_eager_losses(compile_runs, attention):
    compiled, eager = compile_runs[f"{attention}-compiled"], compile_runs[f"{attention}-eager"]
    assert len(compiled["losses"]) == len(eager["losses"]) == 6
    for step, (got, want) in enumerate(zip(compiled["losses"], eager["losses"]), 1):
        assert abs(got - want) <= 2e-2 * abs(want), f"step {step}: compiled {got} vs eager {want}"
    assert compiled["losses"][-1] < compiled["losses"][0]
    assert not eager["inductor_code"]
    assert compiled["inductor_code"], "inductor compiled nothing"
    if attention == "auto":  # the HALO-S blocks' graphs hold the Triton op: they were compiled, not run eager
        assert any("halo_pretrain.attention" in code for code in compiled["inductor_code"])


def test_zero2_and_zero3_with_cpu_offload_train_like_the_gpu_optimizer(tmp_path, data):
    jobs = {}
    for zero in (2, 3):
        for offload in (False, True):
            name = f"zero{zero}{'-offload' if offload else ''}"
            cfg = gpu_config(tmp_path / name, data, zero, "bf16", deepspeed={"offload": offload},
                             train={"steps": 5}, checkpoint={"interval": 5})
            jobs[name] = write_config(tmp_path / f"{name}.yaml", cfg)
    with ThreadPoolExecutor(len(jobs)) as pool:
        ports = range(29720, 29720 + len(jobs))
        list(pool.map(lambda c, p: run_train(c, gpu=True, timeout=600, port=p), jobs.values(), ports))
    for zero in (2, 3):
        gpu_opt = [loss for _, loss in metrics_losses(tmp_path / f"zero{zero}")]
        offloaded = [loss for _, loss in metrics_losses(tmp_path / f"zero{zero}-offload")]
        assert len(offloaded) == len(gpu_opt) == 5
        assert offloaded[0] == gpu_opt[0]  # the same initial weights and batch: the same first forward
        for step, (got, want) in enumerate(zip(offloaded, gpu_opt), 1):
            assert abs(got - want) <= 1e-2 * abs(want), f"ZeRO-{zero} step {step}: offload {got} vs {want}"
        assert offloaded[-1] < offloaded[0]
        assert (tmp_path / f"zero{zero}-offload" / "checkpoints" / "step_00000005" / "complete.json").is_file()


def test_single_gpu_debug_and_single_node_launchers_train_the_same_losses(tmp_path, data):
    runs = {}
    for script in ("single_gpu_debug", "single_node"):
        cfg = gpu_config(tmp_path / script, data, 0, "bf16", train={"steps": 4}, checkpoint={"interval": 4})
        config = write_config(tmp_path / f"{script}.yaml", cfg)
        env = train_env(gpu=True)
        env.update(NUM_GPUS="1", MASTER_PORT=str(29500 + len(runs) + 17))
        proc = subprocess.run(["bash", str(REPO / "launch" / f"{script}.sh"), "--config", str(config)], env=env,
                              cwd=REPO, text=True, capture_output=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        runs[script] = (proc, metrics_losses(tmp_path / script))
    assert "CUDA_LAUNCH_BLOCKING=1" in runs["single_gpu_debug"][0].stderr
    assert "deepspeed.launcher.runner --num_gpus 1" in runs["single_node"][0].stderr
    assert [s for s, _ in runs["single_node"][1]] == [1, 2, 3, 4]
    assert runs["single_gpu_debug"][1] == runs["single_node"][1]
