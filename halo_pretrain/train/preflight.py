"""Checks before any memory is spent: does the run fit the device, and does the model fit the data?

The memory estimate counts, per rank: weights, gradients and AdamW state (as ZeRO partitions them),
and the activations one micro-batch keeps for its backward (docs/training.md, "Before the first
step"). It is compared with what the device has free: the GPU's free memory on CUDA; on a CPU the
RAM available to this process (MemAvailable, or the cgroup's limit under Slurm or a container),
shared by the ranks on the machine. A run that cannot fit stops with the numbers, before an OOM
kill minutes later.
"""

from __future__ import annotations

import inspect
import socket
from dataclasses import dataclass
from pathlib import Path

import torch

from ..attention.neighbors import slots_per_query
from ..config import HaloConfig
from ..model import HaloSModel
from .checkpoint.checkpointer import gather_objects
from .run_config import ConfigError, RunConfig

GIB = 2**30
# torch.compile'd steps keep about 0.7 of the eager activations: the 125m runs of docs/benchmarks.md
# (one H100, bf16) peaked at 25.6, 9.5, 13.6 and 25.4 GiB where the eager count gives 36.5, 12.9,
# 20.3 and 35.0 GiB; with this factor 26.1, 9.6, 14.7 and 25.0 GiB
COMPILED_ACTIVATIONS = 0.7
# HaloSModel.chunked_loss holds the fp32 logits of at most this many tokens at a time
LOSS_CHUNK_TOKENS = inspect.signature(HaloSModel.chunked_loss).parameters["chunk_tokens"].default


@dataclass
class MemoryEstimate:
    parameters: int
    weights: float  # bytes on the device, per rank
    gradients: float
    optimizer: float  # AdamW moments (+ fp32 master weights in mixed precision)
    activations: float  # one micro-batch's saved tensors, logits included
    offloaded: float = 0.0  # bytes ZeRO offload keeps in host RAM instead, per rank

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations

    def breakdown(self) -> str:
        return (f"{self.parameters / 1e6:.1f}M parameters: weights {self.weights / GIB:.2f} GiB, gradients "
                f"{self.gradients / GIB:.2f} GiB, optimizer state {self.optimizer / GIB:.2f} GiB, activations "
                f"{self.activations / GIB:.2f} GiB")


def count_parameters(halo: HaloConfig) -> int:
    """The model's parameter count, from a model built on the meta device (no memory)."""
    with torch.device("meta"):
        return HaloSModel(halo).num_parameters()


def activation_bytes(halo: HaloConfig, backend: str, micro_batch: int, seq_len: int, precision: str,
                     checkpoint_every: int) -> float:
    """What one micro-batch's forward keeps for the backward, per rank. Per token and layer the eager
    block keeps about 11 hidden-sized tensors (norms, projections, RoPE, attention output), 5 of the
    key/value width and 4 of the MLP width; the gather backend also keeps every query's K gathered
    key and value rows and its scores; the reference backend a dense score matrix. Within about 0.85
    to 1.35 of the peak of real eager CPU steps (tests/test_preflight.py); compiled GPU steps keep less."""
    width = 4 if precision == "fp32" else 2
    h, kv, heads = halo.hidden_size, halo.num_kv_heads * halo.head_dim, halo.num_heads
    per_token_layer = 11 * h + 5 * kv + 4 * halo.ffn_size
    slots = slots_per_query(halo) + halo.num_globals
    if backend == "gather":
        per_token_layer += 2 * slots * kv + 4 * heads * slots
    elif backend == "reference":
        per_token_layer += heads * (seq_len + halo.num_globals)
    tokens = micro_batch * seq_len
    layers = halo.num_layers
    if checkpoint_every > 0:  # checkpointed blocks keep their input; the backward recomputes one at a time
        kept = sum(1 for layer in range(layers) if layer % checkpoint_every)
        in_flight = 1
    else:  # the backward holds about two blocks' worth of gradients and temporaries besides
        kept, in_flight = layers, 2
    saved = tokens * width * ((kept + in_flight) * per_token_layer + (layers - kept) * h)
    chunk = min(tokens, LOSS_CHUNK_TOKENS)
    logits = chunk * halo.vocab_size * (4 + 4 + width)  # fp32 logits, their gradient, the head's output
    return saved + logits + 4 * tokens * width * h  # + embedding output, final norm, their gradients


def estimate_memory(cfg: RunConfig, halo: HaloConfig, backend: str, micro_batch: int, world_size: int,
                    parameters: int | None = None) -> MemoryEstimate:
    n = count_parameters(halo) if parameters is None else parameters
    zero, mixed = cfg.deepspeed.zero_stage, cfg.train.precision != "fp32"
    weights = n * (2 if mixed else 4) / (world_size if zero == 3 else 1)
    gradients = n * (2 if mixed else 4) / (world_size if zero >= 2 else 1)
    optimizer = n * (12 if mixed else 8) / (world_size if zero >= 1 else 1)  # fp32 master + 2 moments
    offloaded = 0.0
    if cfg.deepspeed.offload:
        offloaded, optimizer = optimizer, 0.0
        if zero == 3:
            offloaded, weights = offloaded + weights, 0.0
    activations = activation_bytes(halo, backend, micro_batch, cfg.train.seq_len, cfg.train.precision,
                                   cfg.train.activation_checkpointing)
    if cfg.train.compile:  # fused norms, RoPE, SwiGLU and loss keep less
        activations *= COMPILED_ACTIVATIONS
    return MemoryEstimate(n, weights, gradients, optimizer, activations, offloaded)


# ---- what the machine has ---------------------------------------------------------------------------
def _meminfo_available() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cgroup_room() -> float | None:
    """Limit minus usage of this process's memory cgroup (v2 memory.max, or v1 memory.limit_in_bytes)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            root, limit_name, usage_name = Path("/sys/fs/cgroup"), "memory.max", "memory.current"
        elif "memory" in controllers.split(","):
            root, limit_name, usage_name = Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            continue
        for base in (root / path.lstrip("/"), root):  # inside a cgroup namespace the path is not mounted
            try:
                limit = (base / limit_name).read_text().strip()
                usage = int((base / usage_name).read_text())
            except (OSError, ValueError):
                continue
            if limit.isdigit() and int(limit) < 2**60:
                return float(int(limit) - usage)
            break
    return None


def host_memory_available() -> float | None:
    """Bytes of RAM this process can still use; the smaller of MemAvailable and its cgroup's room."""
    known = [x for x in (_meminfo_available(), _cgroup_room()) if x is not None]
    return min(known) if known else None


def device_memory_available(device: torch.device) -> tuple[float | None, str]:
    """(free bytes, a name for the message) of the device the model will train on."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free), f"GPU {device.index} ({torch.cuda.get_device_name(device)})"
    return host_memory_available(), "this machine's RAM"


# ---- the checks -----------------------------------------------------------------------------------
def vocabulary_warning(model_vocab: int, data_vocab: int, tokenizer: str, parameters: int,
                       hidden_size: int, tie_embeddings: bool) -> str | None:
    """A warning when the model's vocabulary is more than twice the data's: rows never trained."""
    if model_vocab <= 2 * data_vocab:
        return None
    unused = (model_vocab - data_vocab) * hidden_size * (1 if tie_embeddings else 2)
    fit = (data_vocab + 63) // 64 * 64
    return (f"model.vocab_size={model_vocab:,} but the data (tokenizer {tokenizer!r}) has {data_vocab:,} token "
            f"ids: {unused / 1e6:.1f}M of the model's {parameters / 1e6:.1f}M parameters "
            f"({100 * unused / parameters:.0f}%) are embedding rows no token uses, and every step computes "
            f"{model_vocab:,} logits per token; set model.vocab_size={fit} or use a preset made for this "
            f"tokenizer")


def memory_error(estimate: MemoryEstimate, available: float, where: str, ranks_sharing: int,
                 cfg: RunConfig, host_is_device: bool = False) -> str | None:
    """The error message when ranks_sharing x the estimate exceeds what `where` has free, else None.
    host_is_device: training on the CPU, where what ZeRO offloads stays in the same RAM."""
    need = (estimate.total + (estimate.offloaded if host_is_device else 0.0)) * ranks_sharing
    if need <= available:
        return None
    shared = f" ({ranks_sharing} ranks on this machine)" if ranks_sharing > 1 else ""
    t = cfg.train
    if estimate.activations > estimate.total / 2:
        hints = [f"a smaller train.micro_batch_size (now {t.micro_batch_size}; raise train.grad_accum to keep "
                 "the global batch)"]
        if t.activation_checkpointing != 1:
            hints.append("train.activation_checkpointing=1")
        hints.append("a shorter train.seq_len")
    else:
        hints = ["more ranks with a higher deepspeed.zero_stage", "deepspeed.offload=true (ZeRO-2/3)"]
    return (f"this run needs about {need / GIB:.1f} GiB{shared} but {where} has {available / GIB:.1f} GiB "
            f"free: {estimate.breakdown()} per rank (micro batch {t.micro_batch_size} x seq_len {t.seq_len}, "
            f"{t.precision}, ZeRO-{cfg.deepspeed.zero_stage}); it would run out of memory. Try "
            f"{', '.join(hints)}, or a smaller model (train.check_memory=false skips this check)")


def check_before_start(cfg: RunConfig, halo: HaloConfig, plan, device: torch.device, train_stream,
                       say=print) -> MemoryEstimate:
    """Warn about a vocabulary far larger than the data's; raise ConfigError (on every rank alike) when
    the run cannot fit in memory. Call after the process group exists, before the model is built."""
    from ..attention import resolve_backend

    parameters = count_parameters(halo)
    manifest = train_stream.datasets[0].manifest  # a blend shares one tokenizer
    warning = vocabulary_warning(halo.vocab_size, manifest.vocab_size, manifest.tokenizer, parameters,
                                 halo.hidden_size, halo.tie_embeddings)
    if warning:
        say(f"warning: {warning}")
    try:
        backend = resolve_backend(halo.attention, device)
    except ValueError as e:
        raise ConfigError(f"model.attention: {e}") from e
    estimate = estimate_memory(cfg, halo, backend, plan.micro_batch_size, plan.world_size, parameters)
    if not cfg.train.check_memory:
        return estimate
    hosts = gather_objects(socket.gethostname())
    # every rank decides alike (none waits on one that stopped)
    verdicts = gather_objects(_verdict(cfg, estimate, device, hosts.count(socket.gethostname())))
    problems = [f"rank {rank}: {v}" if len(verdicts) > 1 else v for rank, v in enumerate(verdicts) if v]
    if problems:
        raise ConfigError(problems[0] + (f" ({len(problems) - 1} more ranks alike)" if len(problems) > 1 else ""))
    return estimate


def _verdict(cfg: RunConfig, estimate: MemoryEstimate, device: torch.device, ranks_here: int = 1) -> str | None:
    available, where = device_memory_available(device)
    on_cpu = device.type == "cpu"
    sharing = ranks_here if on_cpu else 1  # GPUs are one per rank; RAM is shared
    problem = memory_error(estimate, available, where, sharing, cfg, on_cpu) if available is not None else None
    if problem is None and estimate.offloaded and device.type == "cuda":
        host = host_memory_available()
        if host is not None and estimate.offloaded * ranks_here > host:
            problem = (f"ZeRO offload keeps {estimate.offloaded * ranks_here / GIB:.2f} GiB in host RAM "
                       f"({ranks_here} x {estimate.offloaded / GIB:.2f} GiB per rank), which has {host / GIB:.1f} "
                       "GiB free; use more nodes, or deepspeed.offload=false with a higher zero_stage "
                       "(train.check_memory=false skips this check)")
    return problem

