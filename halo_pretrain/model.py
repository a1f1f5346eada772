"""The HALO-S language model (and, with attention='dense', its parameter-matched dense baseline).

embedding -> blocks [norm -> attention (GQA, RoPE, global slots) -> residual -> norm -> MLP -> residual]
-> final norm -> LM head. Global key/value slots are learned per layer and carry no RoPE.

Cached decoding (`forward_cached`, used by halo-generate and the transformers wrapper) computes the same
function: the prompt runs through the model's attention backend, and each later token reads from a
KV cache only its HALO-S neighbours (`neighbor_index` at its position) and the global slots.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from .attention import halo_attention, resolve_backend
from .attention.gather import attend_gathered
from .attention.neighbors import mean_keys_per_query, neighbor_index
from .config import HaloConfig


# keys a transformers config.json holds beside HaloConfig's fields (halo-export writes them; see halo_pretrain/hf)
TRANSFORMERS_KEYS = {"architectures", "auto_map", "dtype", "torch_dtype", "transformers_version", "use_cache",
                     "bos_token_id", "eos_token_id", "pad_token_id"}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def make_norm(config: HaloConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.hidden_size, config.norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=False)


@torch.compiler.disable  # computed once per forward: traced, inductor recomputed cos/sin inside every layer's RoPE
def rope_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.float()[:, None] * inv_freq[None, :]  # [N, D/2]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :D/2], x[..., D/2:]) by the position's angles. x [B, heads, N, D]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Attention(nn.Module):
    def __init__(self, config: HaloConfig, layer: int):
        super().__init__()
        self.config, self.layer = config, layer
        h, kv, d = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, h * d, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, kv * d, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, kv * d, bias=False)
        self.o_proj = nn.Linear(h * d, config.hidden_size, bias=False)
        self.global_k = nn.Parameter(torch.empty(kv, config.num_globals, d))
        self.global_v = nn.Parameter(torch.empty(kv, config.num_globals, d))

    def forward(self, x, cos, sin, backend: str, cache: "CacheStep | None" = None):
        b, n, _ = x.shape
        c = self.config
        q = self.q_proj(x).view(b, n, c.num_heads, c.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, c.num_kv_heads, c.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, c.num_kv_heads, c.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gk, gv = self.global_k.to(q.dtype), self.global_v.to(q.dtype)
        if cache is None:
            out = halo_attention(q, k, v, gk, gv, c, self.layer, backend=backend)
        else:
            out = cache.attend(q, k, v, gk, gv, self.layer, backend)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class MLP(nn.Module):
    def __init__(self, config: HaloConfig):
        super().__init__()
        self.swiglu = config.use_swiglu
        hidden, ffn = config.hidden_size, config.ffn_size
        self.up_proj = nn.Linear(hidden, ffn, bias=False)
        if self.swiglu:
            self.gate_proj = nn.Linear(hidden, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x):
        if self.swiglu:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config: HaloConfig, layer: int):
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = Attention(config, layer)
        self.mlp_norm = make_norm(config)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, backend: str, cache: "CacheStep | None" = None):
        x = x + self.dropout(self.attn(self.attn_norm(x), cos, sin, backend, cache))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class KVCache:
    """Keys (RoPE applied) and values of every position a batch has seen, per layer: [B, KV, capacity, D].

    Rows are left-padded, so every row appends at the same index; row b's position p sits at index
    start[b] + p (`forward_cached` takes start). `update` and `get_seq_length` are those of a transformers
    `Cache`, so `forward_cached` runs as well on the DynamicCache that the transformers wrapper's `generate` makes.
    """

    def __init__(self, config: HaloConfig, batch: int, capacity: int, dtype=torch.float32, device="cpu"):
        shape = (batch, config.num_kv_heads, capacity, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.filled = [0] * config.num_layers

    def update(self, k: torch.Tensor, v: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v [B, KV, M, D] to the layer; returns its keys and values so far [B, KV, L, D]."""
        end = self.filled[layer] + k.shape[2]
        if end > self.k[layer].shape[2]:
            raise ValueError(f"KV cache of {self.k[layer].shape[2]} positions is full; make it larger")
        self.k[layer][:, :, self.filled[layer]:end] = k
        self.v[layer][:, :, self.filled[layer]:end] = v
        self.filled[layer] = end
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def get_seq_length(self, layer: int = 0) -> int:
        return self.filled[layer]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (rows that finished generating leave the batch)."""
        self.k = [k[rows] for k in self.k]
        self.v = [v[rows] for v in self.v]


def take_rows(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """x with, in each batch row b, the entries index[b] along `dim` (index [B, M])."""
    shape = [1] * x.dim()
    shape[0], shape[dim] = index.shape
    return x.gather(dim, index.view(shape).expand(*x.shape[:dim], index.shape[1], *x.shape[dim + 1:]))


class CacheStep:
    """One `forward_cached` call, as each layer's attention sees it.

    Prompt (the cache was empty): the rows are rolled so that each starts at position 0, the attention
    backend runs on them as in training, and their K/V are rolled back into the cache's left-padded order.
    Later calls: the M new tokens of each row sit at `positions` [B, M]; each reads its neighbours.
    """

    def __init__(self, cache, config: HaloConfig, start: torch.Tensor, positions: torch.Tensor | None):
        self.cache, self.config, self.start, self.positions = cache, config, start, positions

    def attend(self, q, k, v, global_k, global_v, layer: int, backend: str) -> torch.Tensor:
        if self.positions is None:
            n = k.shape[2]
            to_cache = (torch.arange(n, device=k.device)[None] - self.start[:, None]) % n
            self.cache.update(take_rows(k, to_cache, 2), take_rows(v, to_cache, 2), layer)
            return halo_attention(q, k, v, global_k, global_v, self.config, layer, backend=backend)
        keys, values = self.cache.update(k, v, layer)  # [B, KV, L, D]
        index, valid = self.neighbours(layer, keys.shape[2])  # [B, M, K] cache indices
        rows = torch.arange(index.shape[0], device=index.device)[:, None, None]
        k_rows = keys[rows, :, index].permute(0, 3, 1, 2, 4)  # [B, KV, M, K, D]
        v_rows = values[rows, :, index].permute(0, 3, 1, 2, 4)
        b, h, m, d = q.shape
        kv = k.shape[1]
        # a few queries per row: scores, softmax and sums in fp32 whatever the model's dtype
        out = attend_gathered(q.view(b, kv, h // kv, m, d).float(), k_rows.float(), v_rows.float(),
                              valid[:, None, None], global_k.float(), global_v.float())
        return out.reshape(b, h, m, d).to(q.dtype)

    def neighbours(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Which of the `length` cache rows each new token reads: (index, valid) [B, M, K]."""
        positions, device = self.positions, self.positions.device
        if self.config.attention == "dense":  # every earlier position of the row
            index = torch.arange(length, device=device).expand(*positions.shape, -1)
            key_positions = index - self.start[:, None, None]
            return index, (key_positions >= 0) & (key_positions <= positions[..., None])
        lo, hi = int(positions.min()), int(positions.max())
        if hi - lo < 4 * positions.numel():  # one call for the span of positions
            index, valid = neighbor_index(hi + 1, self.config, layer, device=device, start=lo)
            index, valid = index[positions - lo], valid[positions - lo]
        else:
            rows = [neighbor_index(p + 1, self.config, layer, device=device, start=p)
                    for p in positions.flatten().tolist()]
            index = torch.cat([r[0] for r in rows]).view(*positions.shape, -1)
            valid = torch.cat([r[1] for r in rows]).view(*positions.shape, -1)
        return index + self.start[:, None, None], valid


class HaloSModel(nn.Module):
    """`model(input_ids)` -> logits [B, N, vocab]; `model(input_ids, labels=labels)` -> (logits, loss).

    labels[b, t] is the target of position t (already shifted), -100 is ignored.
    """

    def __init__(self, config: HaloConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = make_norm(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # a hook the trainer sets to wrap each block (activation checkpointing); signature f(block, x, cos, sin, backend)
        self.block_runner = None
        self.reset_parameters()

    def reset_parameters(self):
        for name, p in self.named_parameters():
            self.init_parameter(name, p)

    def init_parameter(self, name: str, p: torch.Tensor) -> None:
        if p.dim() == 1:  # norm weights
            nn.init.ones_(p)
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            nn.init.normal_(p, 0.0, self.config.init_std / math.sqrt(2 * self.config.num_layers))
        else:
            nn.init.normal_(p, 0.0, self.config.init_std)

    # ---- forward -------------------------------------------------------------------------------
    def check_input(self, input_ids: torch.Tensor, length: int | None = None) -> None:
        """input_ids [batch, seq_len] of in-vocabulary ids, in a sequence of `length` (default seq_len) positions."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
        n = input_ids.shape[1] if length is None else length
        if n > self.config.max_seq_len:
            raise ValueError(
                f"sequence length {n} exceeds HaloConfig.max_seq_len={self.config.max_seq_len}; "
                "raise max_seq_len (the default dilated offsets grow with it) or shorten the input"
            )
        lo, hi = torch.stack(torch.aminmax(input_ids)).tolist()  # one host sync (and one graph break)
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size}) "
                f"(HaloConfig.vocab_size={self.config.vocab_size}): the data and the model disagree"
            )

    def hidden_states(self, input_ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        backend = resolve_backend(self.config.attention, x.device)
        for block in self.blocks:
            if self.block_runner is not None:
                x = self.block_runner(block, x, cos, sin, backend)
            else:
                x = block(x, cos, sin, backend)
        return self.norm(x)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, return_logits: bool = True):
        """With return_logits=False (training), the loss is computed in chunks of tokens whose fp32 logits
        are recomputed in the backward, so [B, N, vocab] fp32 logits are never held (under torch.compile,
        one fused cross-entropy does the same); returns (None, loss)."""
        # the two steps torch.compile leaves out of its graph come first, so the rest is one graph
        self.check_input(input_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        cos, sin = rope_tables(positions, self.config.head_dim, self.config.rope_theta, self.embed.weight.dtype)
        h = self.hidden_states(input_ids, cos, sin)
        if labels is None:
            return self.lm_head(h)
        if not return_logits:
            if torch.compiler.is_compiling():  # inductor fuses the loss into one pass: no fp32 logits either
                return None, self._loss_sum(h.flatten(0, 1), labels.flatten()) / (labels != -100).sum().clamp(min=1)
            return None, self.chunked_loss(h, labels)
        logits = self.lm_head(h)
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        return logits, loss

    @torch.no_grad()
    def forward_cached(self, input_ids: torch.Tensor, cache, start: torch.Tensor | None = None,
                       logits_to_keep: int = 0) -> torch.Tensor:
        """The next M tokens of every row, input_ids [B, M], through `cache` -> logits [B, M, vocab].

        The first call (empty cache) is the prompt: rows left-padded, row b's first token at index
        start[b] (default 0); logits at padding are meaningless. Each later call appends M tokens to every
        row. logits_to_keep=k > 0 returns the logits of the last k tokens only.
        """
        b, m = input_ids.shape
        past = cache.get_seq_length()
        device = input_ids.device
        start = torch.zeros(b, dtype=torch.long, device=device) if start is None else start.to(device)
        self.check_input(input_ids, length=past + m - int(start.min()))
        backend = resolve_backend(self.config.attention, device)
        dtype = self.embed.weight.dtype
        if past == 0:  # roll each row to start at position 0, as training runs it
            step = CacheStep(cache, self.config, start, None)
            x = self.embed(take_rows(input_ids, (torch.arange(m, device=device)[None] + start[:, None]) % m, 1))
            cos, sin = rope_tables(torch.arange(m, device=device), self.config.head_dim, self.config.rope_theta, dtype)
        else:
            positions = past + torch.arange(m, device=device)[None] - start[:, None]  # [B, M]
            step = CacheStep(cache, self.config, start, positions)
            x = self.embed(input_ids)
            cos, sin = rope_tables(positions.flatten(), self.config.head_dim, self.config.rope_theta, dtype)
            cos, sin = cos.view(b, 1, m, -1), sin.view(b, 1, m, -1)  # per row, broadcast over heads
        for block in self.blocks:
            x = block(x, cos, sin, backend, step)
        keep = torch.arange(m - logits_to_keep if 0 < logits_to_keep < m else 0, m, device=device)[None]
        if past == 0:  # back to the cache's order
            keep = (keep - start[:, None]) % m
        return self.lm_head(self.norm(take_rows(x, keep.expand(b, -1), 1)))

    def chunked_loss(self, h: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = 8192) -> torch.Tensor:
        h, labels = h.reshape(-1, h.shape[-1]), labels.reshape(-1)
        total = h.new_zeros((), dtype=torch.float32)
        for s in range(0, h.shape[0], chunk_tokens):
            total = total + torch.utils.checkpoint.checkpoint(
                self._loss_sum, h[s:s + chunk_tokens], labels[s:s + chunk_tokens], use_reentrant=False)
        return total / (labels != -100).sum().clamp(min=1)

    def _loss_sum(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.lm_head(h).float(), labels, ignore_index=-100, reduction="sum")

    # ---- counting ------------------------------------------------------------------------------
    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a tied weight once
        if exclude_embeddings:
            n -= self.embed.weight.numel()
        return n

    def flops_per_token(self, seq_len: int, training: bool = True) -> float:
        """Matmul FLOPs per token, sparse attention counted exactly. See docs/flops.md."""
        c = self.config
        matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        keys = mean_keys_per_query(seq_len, c)
        attention = 4 * c.num_layers * c.num_heads * c.head_dim * keys  # QK^T and PV, 2 FLOPs per MAC
        forward = 2 * matmul + attention
        return 3 * forward if training else forward

    # ---- save / load ---------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if self.config.tie_embeddings:
            state.pop("lm_head.weight", None)
        self.config.to_json(directory / "config.json")
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt", "model_type": "halo-s"})

    @classmethod
    def from_pretrained(cls, directory: str | Path, device="cpu", **config_overrides) -> "HaloSModel":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        config_path = directory / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} not found: expected a directory written by save_pretrained or halo-export")
        saved = {k: v for k, v in json.loads(config_path.read_text()).items() if k not in TRANSFORMERS_KEYS}
        if saved.get("model_type", "halo-s") != "halo-s":
            raise ValueError(f"{config_path}: model_type {saved['model_type']!r} is not a HALO-S model "
                             "(a --format llama export loads with transformers' AutoModelForCausalLM)")
        config = HaloConfig.from_dict(saved, source=str(config_path))
        if config_overrides:
            config = config.replace(**config_overrides)
        index_path = directory / "model.safetensors.index.json"
        if index_path.is_file():  # sharded: exactly the files the index names
            weights = [directory / f for f in sorted(set(json.loads(index_path.read_text())["weight_map"].values()))]
            absent = [f.name for f in weights if not f.is_file()]
            if absent:
                raise FileNotFoundError(f"{index_path} names shards that are missing: {absent}; copy them too")
        else:
            weights = sorted(directory.glob("model*.safetensors"))
        if not weights:
            raise FileNotFoundError(f"{directory} has no model.safetensors (or model-*.safetensors shards)")
        model = cls(config)
        state = {}
        for f in weights:
            try:
                state.update(load_file(str(f), device=str(device)))
            except SafetensorError as e:
                raise ValueError(f"{f} is not a readable safetensors file ({e}): it is truncated or corrupt; "
                                 "copy it again or re-run halo-export") from None
        if all(k.startswith("model.") for k in state):  # saved by the transformers wrapper (HaloSForCausalLM)
            state = {k[len("model."):]: v for k, v in state.items()}
        if config.tie_embeddings:
            state.setdefault("lm_head.weight", state.get("embed.weight"))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{directory}: weights do not fit the config (missing {missing}, unexpected {unexpected})")
        return model.to(device)
