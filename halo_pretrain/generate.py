"""Text generation with a KV cache: each new token reads only its HALO-S neighbours and the global slots.

The decoding itself is the model's (`HaloSModel.forward_cached` over a `KVCache`): the prompt runs once
through the model's own attention backend, and each later token gathers from the cache the keys
`neighbor_index` names for its position, so cached decoding computes the training function exactly.
This module samples, stops, loads models and tokenizers, and is the `halo-generate` command.

A batch of prompts is left-padded: every row keeps its true positions (RoPE and the neighbour set
depend on them, and the model never reads the padding).
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import warnings
from pathlib import Path
from typing import Sequence

import torch

from .model import HaloSModel, KVCache


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of logits [B, vocab]. temperature 0 is greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].to(logits.device)


def check_sampling(max_new_tokens: int, temperature: float, top_k, top_p) -> None:
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 0")
    if temperature < 0:
        raise ValueError(f"temperature={temperature}: must be >= 0 (0 is greedy)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k}: must be >= 1 (or None for no top-k filter)")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p}: must be in (0, 1]")


@torch.no_grad()
def generate(model: HaloSModel, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             stop_tokens: Sequence[int] = (), seed: int | None = None, pad_id: int = 0) -> list[list[int]]:
    """The new tokens of each prompt (a stop token ends a row and is not returned).

    A row also ends at max_seq_len tokens in all (with a warning). A prompt longer than max_seq_len
    is an error.
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    prompts = [[int(t) for t in p] for p in prompts]
    max_len = model.config.max_seq_len
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty: give at least one token (e.g. the end-of-document id)")
        if len(p) > max_len:
            raise ValueError(
                f"prompt {i} has {len(p)} tokens, more than the model's max_seq_len={max_len}: "
                f"shorten it (keep its last {max_len} tokens at most)"
            )
    if not prompts or max_new_tokens == 0:
        return [[] for _ in prompts]
    was_training = model.training
    model.eval()
    try:
        return _decode(model, prompts, max_new_tokens, temperature, top_k, top_p, stop_tokens, seed, pad_id)
    finally:
        model.train(was_training)


def _decode(model, prompts, max_new_tokens, temperature, top_k, top_p, stop_tokens, seed, pad_id):
    max_len = model.config.max_seq_len
    outputs: list[list[int]] = [[] for _ in prompts]
    device = model.embed.weight.device
    lengths = [len(p) for p in prompts]
    longest = max(lengths)
    padded = torch.full((len(prompts), longest), pad_id, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        padded[i, longest - len(p):] = torch.tensor(p, device=device)
    start = longest - torch.tensor(lengths, device=device)
    # the shortest prompt generates longest: it ends at max_seq_len positions, or after max_new_tokens
    cache = KVCache(model.config, len(prompts), longest + min(max_new_tokens, max_len - min(lengths)),
                    model.embed.weight.dtype, device)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    stop = set(int(t) for t in stop_tokens)
    live = list(range(len(prompts)))  # the rows still generating, in the cache's batch order
    logits = model.forward_cached(padded, cache, start, logits_to_keep=1)[:, -1]
    clipped = False
    while True:
        chosen = sample_next(logits, temperature, top_k, top_p, generator)
        keep = []
        for row, (i, t) in enumerate(zip(live, chosen.tolist())):
            if t in stop:
                continue
            outputs[i].append(t)
            lengths[i] += 1
            if lengths[i] == max_len and len(outputs[i]) < max_new_tokens:
                clipped = True
            elif len(outputs[i]) < max_new_tokens:
                keep.append(row)
        if not keep:
            break
        if len(keep) < len(live):  # finished rows leave the batch
            index = torch.tensor(keep, device=device)
            cache.select(index)
            live, start, chosen = [live[r] for r in keep], start[index], chosen[index]
        logits = model.forward_cached(chosen[:, None], cache, start)[:, -1]
    if clipped:
        warnings.warn(f"generation stopped at max_seq_len={max_len} tokens (prompt + generated) for some prompts")
    return outputs


# ---- loading a model and its tokenizer ------------------------------------------------------------


def load_model(path: str | Path, step: int | None = None, device: str = "cpu") -> HaloSModel:
    """An exported directory (config.json + model*.safetensors) or a training run directory."""
    path = Path(path)
    if (path / "config.json").is_file():
        return HaloSModel.from_pretrained(path, device=device)
    from .export import load_run_model

    return load_run_model(path, step=step).to(device)


def tokenizer_name(model_dir: str | Path, tokenizer: str | None = None, data: str | Path | None = None) -> str:
    """The tokenizer to use: --tokenizer, else the exported directory's record, else the data manifest."""
    if tokenizer:
        return tokenizer
    from .export import TOKENIZER_FILE, run_data_dir

    model_dir = Path(model_dir)
    record = model_dir / TOKENIZER_FILE
    name = json.loads(record.read_text()).get("tokenizer") if record.is_file() else None
    if name:
        local = model_dir / name
        return str(local) if local.is_file() else name
    if data is None:
        data = run_data_dir(model_dir)
    if data is not None:
        from .data.manifest import load_manifest

        return load_manifest(data).tokenizer
    raise ValueError(
        f"{model_dir}: no {TOKENIZER_FILE} and no data directory to read the tokenizer from; "
        "pass --tokenizer NAME_OR_FILE or --data PREPARED_DIR"
    )


def load_tokenizer(model_dir, tokenizer: str | None = None, data=None):
    from .data.tokenizer import get_tokenizer

    return get_tokenizer(tokenizer_name(model_dir, tokenizer, data))


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="halo-generate", description="Generate text from an exported model or a run directory.")
    p.add_argument("model", help="exported directory (halo-export) or training run directory")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for a batch)")
    p.add_argument("--prompt-file", help="a file with one prompt per line")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop at this text (one token) or token id; "
                   "the end-of-document token always stops")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step", type=int, default=None, help="checkpoint step when MODEL is a run directory")
    p.add_argument("--tokenizer", default=None, help="override the recorded tokenizer")
    p.add_argument("--data", default=None, help="prepared data directory whose manifest names the tokenizer")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    return p.parse_args(argv)


def stop_ids(tokenizer, stops: list[str]) -> list[int]:
    ids = [tokenizer.eod_id]
    for s in stops:
        if s.isdigit():
            ids.append(int(s))
            continue
        encoded = tokenizer.encode(s)
        if len(encoded) != 1:
            raise ValueError(f"--stop {s!r} is {len(encoded)} tokens; give a single-token text or a token id")
        ids.append(encoded[0])
    return ids


def main(argv=None) -> int:
    args = parse_args(argv)
    prompts = list(args.prompt)
    if args.prompt_file:
        prompts += [line.rstrip("\n") for line in Path(args.prompt_file).read_text().splitlines() if line.strip()]
    if not prompts:
        raise SystemExit("halo-generate: give --prompt TEXT (repeatable) or --prompt-file FILE")
    try:
        model = load_model(args.model, step=args.step, device=args.device)
        tokenizer = load_tokenizer(args.model, args.tokenizer, args.data)
        encoded = [tokenizer.encode(p) for p in prompts]
        outputs = generate(model, encoded, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                           stop_ids(tokenizer, args.stop), seed=args.seed)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        raise SystemExit(f"halo-generate: {e}") from None
    except pickle.UnpicklingError as e:
        from .export import unpickling_refusal

        raise SystemExit(unpickling_refusal("halo-generate", args.model, e)) from None
    for prompt, out in zip(prompts, outputs):
        text = tokenizer.decode(out)
        if args.json:
            print(json.dumps({"prompt": prompt, "completion": text, "tokens": out}))
        else:
            print(prompt + text)
            print("-" * 40)
    return 0


if __name__ == "__main__":
    sys.exit(main())
