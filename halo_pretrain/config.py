"""HaloConfig: the model's shape and its sparse-attention pattern (field names kept from pyhalos)."""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

BACKENDS = ("auto", "reference", "gather", "flex", "triton", "dense")
NORMS = ("rmsnorm", "layernorm")


@dataclass
class HaloConfig:
    vocab_size: int = 50304
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    num_kv_heads: int = 4
    num_globals: int = 4
    local_window: int = 64
    dilated_offsets: Optional[list[int]] = None  # None: 2W, 4W, 8W, ... < max_seq_len
    num_random: int = 2
    dropout: float = 0.0
    max_seq_len: int = 4096
    use_swiglu: bool = True
    intermediate_size: Optional[int] = None  # None: 8/3·hidden (SwiGLU) or 4·hidden (GELU), rounded up to 64
    attention: str = "auto"
    rope_theta: float = 10000.0
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    seed: int = 0

    def __post_init__(self):
        if self.dilated_offsets is not None:
            self.dilated_offsets = [int(d) for d in self.dilated_offsets]
        self.validate()

    # ---- derived -------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ffn_size(self) -> int:
        if self.intermediate_size is not None:
            return self.intermediate_size
        raw = 8 * self.hidden_size // 3 if self.use_swiglu else 4 * self.hidden_size
        return (raw + 63) // 64 * 64

    @property
    def offsets(self) -> list[int]:
        """The dilated offsets in force: the configured ones, or the contract's default."""
        if self.dilated_offsets is not None:
            return list(self.dilated_offsets)
        out, d = [], 2 * self.local_window
        while d < self.max_seq_len:
            out.append(d)
            d *= 2
        return out

    # ---- checks --------------------------------------------------------------------------------
    def validate(self) -> None:
        def bad(name, why):
            raise ValueError(f"HaloConfig.{name}={getattr(self, name)!r}: {why}")

        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "max_seq_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, "must be a positive integer")
        if self.hidden_size % self.num_heads:
            bad("hidden_size", f"must be divisible by num_heads={self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            bad("num_heads", f"must be divisible by num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            bad("hidden_size", f"head_dim={self.head_dim} must be even for RoPE")
        if self.local_window < 1:
            bad("local_window", "must be at least 1 (the token itself)")
        if self.num_globals < 0:
            bad("num_globals", "must be >= 0")
        if self.num_random < 0:
            bad("num_random", "must be >= 0")
        if self.dilated_offsets is not None:
            offs = self.dilated_offsets
            if any(d < 1 for d in offs):
                bad("dilated_offsets", "every offset must be >= 1")
            if offs != sorted(set(offs)):
                bad("dilated_offsets", "must be strictly increasing (sorted, no duplicates)")
        if not 0.0 <= self.dropout < 1.0:
            bad("dropout", "must be in [0, 1)")
        if self.attention not in BACKENDS:
            bad("attention", f"unknown backend; choose one of {', '.join(BACKENDS)}")
        if self.norm not in NORMS:
            bad("norm", f"choose one of {', '.join(NORMS)}")
        if self.intermediate_size is not None and self.intermediate_size < 1:
            bad("intermediate_size", "must be positive")

    # ---- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps({"model_type": "halo-s", **self.to_dict()}, indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_dict(cls, d: dict, *, source: str = "config") -> "HaloConfig":
        d = dict(d)
        d.pop("model_type", None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            warnings.warn(f"{source}: ignoring unknown HaloConfig fields {unknown} (written by a newer version?)")
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> "HaloConfig":
        p = Path(path_or_text) if not str(path_or_text).lstrip().startswith("{") else None
        if p is not None:
            return cls.from_dict(json.loads(p.read_text()), source=str(p))
        return cls.from_dict(json.loads(str(path_or_text)))

    def replace(self, **changes) -> "HaloConfig":
        return dataclasses.replace(self, **changes)


BYTE_VOCAB = 320  # the byte tokenizer's 256 bytes + specials, padded to a multiple of 64
GPT2_VOCAB = 50304  # gpt2's 50257 padded to a multiple of 64

PRESETS: dict[str, dict] = {
    # small presets for the byte tokenizer: tests, quickstart, laptops
    "tiny": dict(vocab_size=BYTE_VOCAB, hidden_size=128, num_layers=5, num_heads=4, num_kv_heads=2,
                 local_window=32, max_seq_len=1024),
    "small": dict(vocab_size=BYTE_VOCAB, hidden_size=256, num_layers=5, num_heads=8, num_kv_heads=2,
                  local_window=64, max_seq_len=2048),
    "medium": dict(vocab_size=BYTE_VOCAB, hidden_size=512, num_layers=7, num_heads=8, num_kv_heads=4,
                   local_window=64, max_seq_len=4096),
    # GPT-style sizes for a BPE vocabulary
    "125m": dict(hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=4, max_seq_len=4096),
    "350m": dict(hidden_size=1024, num_layers=24, num_heads=16, num_kv_heads=4, max_seq_len=4096),
    "760m": dict(hidden_size=1536, num_layers=24, num_heads=16, num_kv_heads=4, max_seq_len=4096),
    "1.3b": dict(hidden_size=2048, num_layers=24, num_heads=16, num_kv_heads=4, max_seq_len=4096),
    # long context: 125m shape, 128k positions, RoPE base raised for the range
    "125m-long": dict(hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=4, max_seq_len=131072,
                      rope_theta=500000.0),
}


def get_preset(name: str, **overrides) -> HaloConfig:
    if name not in PRESETS:
        raise ValueError(f"model preset {name!r} is unknown; choose one of {', '.join(PRESETS)}")
    return HaloConfig(**{**PRESETS[name], **overrides})
