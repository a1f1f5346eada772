"""Helpers for the trainer tests: prepared data directories, tiny run configs, launching halo-train."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import yaml

from halo_pretrain.data.indexed import encode_index, token_dtype_for_vocab
from halo_pretrain.data.manifest import FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME
from halo_pretrain.data.tokenizer import get_tokenizer

REPO = Path(__file__).resolve().parents[1]


def write_shard(prefix: Path, tokens: np.ndarray, lengths: np.ndarray) -> dict:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    Path(str(prefix) + ".bin").write_bytes(tokens.tobytes())
    Path(str(prefix) + ".idx").write_bytes(encode_index(tokens.dtype, lengths, np.arange(len(lengths) + 1)))
    return {"prefix": prefix.name, "num_tokens": int(tokens.size), "num_docs": int(len(lengths)), "checksums": {}}


def make_prepared_dir(out: Path, train_docs: list[str], val_docs: list[str], docs_per_shard: int = 10**9,
                      tokenizer: str = "byte", vocab_size: int | None = None) -> Path:
    """A data directory in halo-prep's layout (Megatron shards + manifest.json), written with the reader's
    own index encoder, for tests that must not wait on a corpus."""
    tok = get_tokenizer(tokenizer)
    dtype = token_dtype_for_vocab(tok.vocab_size)
    splits = {}
    for split, docs in (("train", train_docs), ("validation", val_docs)):
        entries = []
        for i in range(0, len(docs), docs_per_shard):
            tokens, lengths = tok.encode_documents(docs[i:i + docs_per_shard], dtype)
            entries.append(write_shard(out / f"{split}_{i // docs_per_shard:05d}", tokens, lengths))
        splits[split] = entries
    manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "tokenizer": tok.spec,
                "tokenizer_name": tok.name, "vocab_size": vocab_size or tok.vocab_size, "eod_id": tok.eod_id,
                "dtype": dtype.name, "splits": splits}
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
    return out


def record_checksums(data_dir: Path) -> Path:
    """Record every shard file's SHA-256 in the manifest, as halo-prep does (make_prepared_dir leaves them out)."""
    from halo_pretrain.fileio import sha256_file

    manifest = json.loads((data_dir / MANIFEST_NAME).read_text())
    for entries in manifest["splits"].values():
        for e in entries:
            e["checksums"] = {s: "sha256:" + sha256_file(data_dir / f"{e['prefix']}.{s}") for s in ("bin", "idx")}
    (data_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
    return data_dir


def stdlib_sources(limit_bytes: int, skip: int = 0) -> list[str]:
    """Real text that exists on every machine: the Python standard library's own source files."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs, total = [], 0
    for path in sorted(root.glob("*.py"))[skip:]:
        text = path.read_text(encoding="utf-8", errors="replace")
        docs.append(text)
        total += len(text)
        if total >= limit_bytes:
            break
    return docs


def tiny_config(run_dir: Path, data_dir: Path, **sections) -> dict:
    """A run config for a model that trains in seconds on a CPU, fp32 for bit-exact comparisons."""
    cfg = {
        "seed": 7,
        "model": {"preset": "tiny", "hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                  "local_window": 8, "num_globals": 2, "max_seq_len": 64},
        "data": {"path": str(data_dir)},
        "train": {"seq_len": 32, "micro_batch_size": 2, "grad_accum": 2, "steps": 8, "precision": "fp32"},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "min_lr": 3e-4},
        "eval": {"interval": 0, "samples": 8},
        "checkpoint": {"interval": 3, "keep_last": 2},
        "run": {"dir": str(run_dir)},
        "deepspeed": {"zero_stage": 0},
        "logging": {"progress_bar": False},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def train_env(gpu: bool = False) -> dict:
    """The environment of a halo-train process: CPU ranks, or (gpu=True) the GPUs this machine has,
    compiled Triton kernels and DeepSpeed's CUDA accelerator."""
    env = dict(os.environ)
    env.update(PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""), WANDB_MODE="offline",
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if gpu:
        for key in ("DS_ACCELERATOR", "TRITON_INTERPRET"):
            env.pop(key, None)
    else:
        env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def train_command(config: Path, nproc: int, overrides: list[str] = (), port: int | None = None) -> list[str]:
    """halo-train as one plain process, or under the deepspeed launcher with nproc processes."""
    if nproc == 1:
        return [sys.executable, "-m", "halo_pretrain.train", "--config", str(config), *overrides]
    from halo_pretrain.train.distributed import free_port

    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
            "--master_port", str(port or free_port()), "--module", "halo_pretrain.train",
            "--config", str(config), *overrides]


def run_train(config: Path, nproc: int = 1, overrides: list[str] = (), timeout: float = 300,
              check: bool = True, gpu: bool = False, port: int | None = None) -> subprocess.CompletedProcess:
    """port: the rendezvous port of a single process, for runs started at the same moment (each picking
    a free port on its own can pick the same one)."""
    env = train_env(gpu)
    if port is not None:
        env["MASTER_PORT"] = str(port)
    proc = subprocess.run(train_command(config, nproc, overrides), env=env, cwd=REPO, text=True,
                          capture_output=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"halo-train exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n"
                             f"--- stderr\n{proc.stderr[-6000:]}")
    return proc


def run_until_killed(config: Path, nproc: int, kill_after_steps: int, timeout: float = 300) -> int:
    """Start halo-train and SIGKILL its whole process group once metrics.jsonl has kill_after_steps lines."""
    run_dir = Path(yaml.safe_load(config.read_text())["run"]["dir"])
    metrics = run_dir / "metrics.jsonl"
    start_lines = len(metrics.read_text().splitlines()) if metrics.exists() else 0
    proc = subprocess.Popen(train_command(config, nproc), env=train_env(), cwd=REPO, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            lines = len(metrics.read_text().splitlines()) if metrics.exists() else 0
            if lines - start_lines >= kill_after_steps:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return lines - start_lines
            if proc.poll() is not None:
                raise AssertionError(f"halo-train ended (exit {proc.returncode}) before step {kill_after_steps}:\n"
                                     f"{proc.stderr.read()[-4000:]}")
            time.sleep(0.05)
        raise AssertionError("halo-train did not reach the kill step in time")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def losses(run_dir: Path) -> list[float]:
    from halo_pretrain.train.metrics import read_metrics

    return [m["loss"] for m in read_metrics(run_dir)]
