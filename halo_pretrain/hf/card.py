"""README.md of an export: what the model is, how far it trained, how well, and how to load it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..config import HaloConfig


@dataclass
class CardFacts:
    config: HaloConfig
    format: str  # "halo-s" or "llama"
    parameters: int
    step: int
    tokens: int
    dtype: str
    tokenizer: str | None  # the tokenizer's name, when the run's data recorded one
    val_loss: float | None
    val_step: int | None


def final_val_loss(run_dir: Path, step: int) -> tuple[float | None, int | None]:
    """The last validation loss in the run's metrics.jsonl at or before `step` (None, None when none)."""
    from ..plot import read_metrics

    try:
        records = read_metrics(run_dir)
    except (FileNotFoundError, ValueError):
        return None, None
    measured = [r for r in records if r.get("val_loss") is not None and r["step"] <= step]
    return (measured[-1]["val_loss"], measured[-1]["step"]) if measured else (None, None)


def attention_line(c: HaloConfig) -> str:
    if c.attention == "dense":
        kind = "dense causal attention (the parameter-matched baseline)"
    else:
        kind = (f"HALO-S sparse attention: a window of {c.local_window} keys, dilated keys at offsets "
                f"{c.offsets}, {c.num_random} hashed random keys per query (seed {c.seed})")
    globals_ = f", {c.num_globals} learned global key/value slots per layer" if c.num_globals else ""
    return kind + globals_


def model_card(name: str, f: CardFacts) -> str:
    c = f.config
    mlp = f"{'SwiGLU' if c.use_swiglu else 'GELU'} MLP of width {c.ffn_size}"
    shape = (f"{c.num_layers} layers, hidden {c.hidden_size}, {c.num_heads} heads ({c.num_kv_heads} KV heads, "
             f"head_dim {c.head_dim}), {mlp}, {c.norm}, vocabulary {c.vocab_size}, "
             f"{'tied' if c.tie_embeddings else 'untied'} embeddings, RoPE theta {c.rope_theta:g}")
    if f.val_loss is None:
        val = "not measured (the run logged no val_loss up to this step)"
    else:
        val = f"{f.val_loss:.4f} (perplexity {math.exp(min(f.val_loss, 700.0)):.2f}) at step {f.val_step}"
    remote = f.format == "halo-s"
    trust = ", trust_remote_code=True" if remote else ""
    tags = ["halo-pretrain", "halo-s" if c.attention != "dense" else "dense-baseline", "llama" if not remote else None]
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-generation",
        "tags:", *[f"- {t}" for t in tags if t], "---", "",
        f"# {name}", "",
        f"A {f.parameters / 1e6:.2f}M-parameter language model pretrained with halo-pretrain"
        + (", exported as a plain Llama model." if not remote else "."), "",
        "| | |", "| --- | --- |",
        f"| shape | {shape} |",
        f"| attention | {attention_line(c)} |",
        f"| context | {c.max_seq_len} positions |",
        f"| tokenizer | {f.tokenizer or 'not recorded (the run named no data manifest)'} |",
        f"| tokens trained | {f.tokens:,} ({f.step} optimizer steps) |",
        f"| final validation loss | {val} |",
        f"| weights | {f.dtype}, safetensors |", "",
        "## Load", "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'model = AutoModelForCausalLM.from_pretrained("{name}"{trust})',
        f'tokenizer = AutoTokenizer.from_pretrained("{name}"{trust})',
        'ids = tokenizer(["Once upon a time"], return_tensors="pt")',
        "print(tokenizer.decode(model.generate(**ids, max_new_tokens=32, do_sample=False)[0]))",
        "```", "",
    ]
    if remote:
        lines += [
            "`trust_remote_code=True` runs `modeling_halo.py` and `configuration_halo.py` of this directory, which "
            "only import halo-pretrain's implementation: install it first (`pip install halo-pretrain[hf]`). "
            "Rows of a batch are left-padded (the tokenizer's default): a HALO-S row's positions are its own.", "",
            "With halo-pretrain alone:", "",
            "```python",
            "from halo_pretrain.model import HaloSModel",
            f'model = HaloSModel.from_pretrained("{name}")',
            "```", "",
            f"```bash\nhalo-generate {name} --prompt \"Once upon a time\" --temperature 0\n```", "",
        ]
    lines += [
        "Evaluate with lm-evaluation-harness (the bundled offline smoke tasks, or any task of the harness):", "",
        "```bash",
        f"lm_eval --model hf --model_args pretrained={name}{',trust_remote_code=True' if remote else ''} \\",
        "    --tasks halo_smoke --include_path $(python -m halo_pretrain.evaluate.lm_eval_tasks) --device cpu",
        "```", "",
    ]
    return "\n".join(lines)
