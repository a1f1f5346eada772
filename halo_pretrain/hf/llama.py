"""A dense halo-pretrain model as a plain transformers LlamaForCausalLM (`halo-export --format llama`).

The dense baseline is Llama's function when nothing HALO-S-specific is left: full causal attention,
no global slots, RMSNorm and a SwiGLU MLP. RoPE rotates the two halves of each head, as Llama's
does, with the same frequencies. So only the weight names change.
"""

from __future__ import annotations

import re

from ..config import HaloConfig

RENAMES = [  # (HaloSModel name, LlamaForCausalLM name)
    (r"embed\.weight", "model.embed_tokens.weight"),
    (r"norm\.weight", "model.norm.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
    (r"blocks\.(\d+)\.attn_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"blocks\.(\d+)\.mlp_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"blocks\.(\d+)\.attn\.([qkvo]_proj)\.weight", r"model.layers.\1.self_attn.\2.weight"),
    (r"blocks\.(\d+)\.mlp\.(\w+_proj)\.weight", r"model.layers.\1.mlp.\2.weight"),
]


def why_not_llama(config: HaloConfig) -> str | None:
    """Why this model has no Llama form (one line), or None when it has one."""
    reasons = []
    if config.attention != "dense":
        reasons.append(f"HALO-S sparse attention (attention={config.attention!r}) has no Llama form: Llama attends "
                       "to every earlier token, so only a model trained with model.attention: dense exports as Llama")
    if config.num_globals:
        reasons.append(f"its {config.num_globals} global key/value slots per layer have no Llama form "
                       "(train the dense model with model.num_globals: 0)")
    if config.norm != "rmsnorm":
        reasons.append(f"norm={config.norm!r}: Llama's norm is RMSNorm")
    if not config.use_swiglu:
        reasons.append("use_swiglu=false: Llama's MLP is SwiGLU")
    return "; ".join(reasons) or None


def llama_weights(state: dict) -> dict:
    """HaloSModel's state dict under LlamaForCausalLM's names (the empty global-slot tensors dropped)."""
    out = {}
    for name, tensor in state.items():
        if name.endswith(("attn.global_k", "attn.global_v")):
            if tensor.numel():
                raise ValueError(f"{name} holds global slots, which Llama has no place for")
            continue
        for pattern, replacement in RENAMES:
            if re.fullmatch(pattern, name):
                out[re.sub(pattern, replacement, name)] = tensor
                break
        else:
            raise ValueError(f"weight {name} has no LlamaForCausalLM counterpart")
    return out


def llama_config(config: HaloConfig, dtype: str, token_ids: dict) -> dict:
    """config.json of the LlamaForCausalLM directory. rope_theta is written both ways transformers reads it
    (4.x: rope_theta; 5.x: rope_parameters)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.ffn_size, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim, "hidden_act": "silu", "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps, "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
        "tie_word_embeddings": config.tie_embeddings, "initializer_range": config.init_std,
        "use_cache": True, "dtype": dtype, **token_ids,
    }
